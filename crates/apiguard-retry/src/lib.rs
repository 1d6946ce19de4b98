//! apiguard retry (work in progress).

//! apiguard facade (work in progress).

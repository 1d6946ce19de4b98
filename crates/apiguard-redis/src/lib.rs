//! apiguard redis (work in progress).

//! Fixtures shared by Windlass's cross-crate and end-to-end tests.

//! Windlass proxy library. Not yet written: see the project's issues.

//! gpc

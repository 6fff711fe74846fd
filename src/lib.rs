//! xenkvm

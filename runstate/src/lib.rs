//! runstate

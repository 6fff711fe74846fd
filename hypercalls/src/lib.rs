//! hypercalls

//! Pure architecture code: no ioctls, no threads. `#![forbid(unsafe_code)]`
//! applies to everything below (see `x86`).

#![forbid(unsafe_code)]

pub mod x86;

//! xen-abi

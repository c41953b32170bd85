//! Empty library target: userspace's build script depends on this crate so that cargo
//! rebuilds the kernel programs (the `ambit` binary target) when they change.
#![no_std]

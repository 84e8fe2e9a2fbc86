//! tmp
#![deny(missing_docs)]
pub mod digest;
pub mod error;
pub mod index;
pub mod store;
pub mod tree;
pub use digest::Digest;
pub use error::{Error, Result};

pub mod config;
pub mod credentials;
pub mod jwt;
pub mod policy;

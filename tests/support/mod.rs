//! Shared test support, by role: [`harness`] (credproxy in process on
//! 127.0.0.1:0 with a fresh SQLite store and key, or the built binary),
//! [`process`] (starting `credproxy serve` and reading its listening line;
//! shared with the load bench), [`clients`] (curl, Python requests/httpx),
//! [`peers`] (httpbin, oidc-provider, PostgreSQL, moto, h2 httpbin) and
//! [`logs`] (credproxy's log captured at TRACE for secret scans).

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(clippy::print_stderr, reason = "test diagnostics")]

pub mod clients;
pub mod harness;
pub mod logs;
pub mod peers;
pub mod process;

use std::path::PathBuf;

// A test binary that uses none of a part's items would warn.
#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub use {clients::*, harness::*, peers::*};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// `ADMIN_TOKEN`'s name in the audit trail.
pub const ADMIN_TOKEN_NAME: &str = "test-backend";
pub const ORG_TOKEN: &str = "test-org-token-for-org-local-0123";
pub const ORG: &str = "org_local";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

//! Policy decisions on the request path, all pure: which hosts a connection's
//! credential may go to ([`hosts`]), which destination addresses are
//! prohibited ([`ssrf`]).
//!
//! Must not import `proxy`, `admin`, `creds` or anything that does I/O.

pub mod hosts;
pub mod ssrf;

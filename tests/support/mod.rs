//! Test support for regproxy's end-to-end tests: a real registry (Debian's `docker-registry`,
//! distribution 2.8) over TLS on loopback, synthetic OCI images, the proxy on its own thread, and
//! skopeo as the client. Everything is synchronous: tests are plain `#[test]` functions.
//!
//! Use from an integration test with `mod support;` and `use support::*;`.
//!
//! Every external command runs with a timeout, so no test hangs forever. A missing tool is a panic
//! that says how to get it (there is no skip): run `scripts/test.sh`.
//!
//! Debugging: `REGPROXY_KEEP_TEST_DIRS=1` keeps the temporary directories (registry log, proxy cache,
//! OCI layouts) and prints where they are; `RUST_LOG` sets the proxy's log filter (default
//! `regproxy=debug,warn`), printed by the test harness for failing tests.
//!
//! Every test binary compiles this module on its own and uses a different part of it, hence the
//! `allow`s: an unused helper is not a warning.

#![allow(dead_code)]

mod admin;
mod browser;
mod certs;
mod clients;
mod garage;
mod net;
mod process;
mod proxy;
mod registry;
mod token;

#[allow(unused_imports)]
pub use {
    admin::*, browser::*, certs::*, clients::*, garage::*, net::*, process::*, proxy::*,
    registry::*, token::*,
};

pub use regproxy::Config;

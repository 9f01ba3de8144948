//! Tests that cannot run where they are (no PostgreSQL, not root) say so and pass, unless
//! `TMS_TEST_REQUIRE_ALL=1` (scripts/test sets it): then a skip fails the test, so CI cannot
//! pass with a fault test that never ran.

/// Says that the calling test is skipped and why; panics instead under
/// `TMS_TEST_REQUIRE_ALL=1`. The caller returns after it.
pub fn skip(why: &str) {
    let required = std::env::var("TMS_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "TMS_TEST_REQUIRE_ALL=1 and this test cannot run: {why}"
    );
    eprintln!("SKIPPED: {why}");
}

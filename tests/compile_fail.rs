//! Misuse of `#[cached]` is a compile error spanned on the offending token.
//! The expected messages live next to each case in `tests/ui/*.stderr`.

#[test]
fn misuse_is_a_clear_compile_error() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}

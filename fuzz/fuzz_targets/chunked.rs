//! The chunked decoder against a reference written from RFC 9112 §7.1
//! (fuzz/src/lib.rs): the same accept or refuse, the same data, the same
//! bytes taken (where the next message starts), the same error position,
//! however the input is cut into reads.
#![no_main]

use credproxy::h1::fuzz::decode_chunked;
use credproxy_fuzz::{reference_chunked, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: credproxy_fuzz::self_test(),
    |input: &[u8]| {
    let [seed, data @ ..] = input else { return };
    let want = reference_chunked(data);
    let got = decode_chunked(&split(data, *seed)).map_err(|(_, at)| at);
    assert_eq!(got, want, "decoder and reference disagree");
    let whole = decode_chunked(&[data]).map_err(|(_, at)| at);
    assert_eq!(whole, want, "decoder and reference disagree (one read)");
});

//! The head tokenizer (src/h1/head.rs) against httparse, the parser it
//! replaced: any bytes, read as a request head and as a response head,
//! with room for a given number of fields — the same outcome (complete,
//! incomplete, refused, too many fields), the same request or status line,
//! every field the same bytes at the same place.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // [room for fields: 0-79, past the 64 kept without an allocation] then the head.
    let [room, head @ ..] = input else { return };
    if let Err(disagreement) = credproxy::h1::head::agrees(head, usize::from(*room % 80)) {
        panic!("tokenizer and httparse disagree: {disagreement}");
    }
});

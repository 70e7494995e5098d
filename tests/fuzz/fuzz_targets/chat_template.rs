#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    loralab::fuzzing::chat_template(data);
});

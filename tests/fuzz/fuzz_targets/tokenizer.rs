#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The tokenizers crate panics on some malformed files, and loralab turns that panic into an
    // error (`parse_tokenizer_json`); libFuzzer's panic hook would abort before it could. A panic
    // that escapes still ends the run as a crash.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    loralab::fuzzing::tokenizer(data);
    std::panic::set_hook(hook);
});

//! Training rows, tokenized with the default model's chat template, and their loss masks.

use candle_core::{DType, Device};
use loralab::data::{row_from_json, tokenize, LossMask};
use loralab::model::{self, LoadOptions};

fn model() -> model::Model {
    model::load(model::DEFAULT_MODEL, &LoadOptions { dtype: DType::F32, device: Device::Cpu }).unwrap()
}

fn trained_text(m: &model::Model, row: serde_json::Value, mask: LossMask) -> String {
    let ex = tokenize(&m.tokenizer, &row_from_json(row).unwrap(), &mask, 4096).unwrap();
    let ids: Vec<u32> = ex.ids.iter().zip(&ex.target).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
    m.tokenizer.decode(&ids, false).unwrap()
}

#[test]
fn last_assistant_trains_only_the_final_answer_and_its_end_of_turn() {
    let m = model();
    let row = serde_json::json!({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]});
    assert_eq!(trained_text(&m, row.clone(), LossMask::LastAssistant), "Goodbye!<|im_end|>");
    assert_eq!(trained_text(&m, row, LossMask::AllAssistant), "Hello there.<|im_end|>Goodbye!<|im_end|>");
}

#[test]
fn a_completion_row_trains_its_completion() {
    let m = model();
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "2+2?"}],
                                 "completion": [{"role": "assistant", "content": "4"}]});
    assert_eq!(trained_text(&m, row, LossMask::Completion), "4<|im_end|>");
}

#[test]
fn marker_only_trains_the_marker_and_the_last_token() {
    let m = model();
    let marker = "[ZLT]".to_string();
    let pos = serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}],
                                 "completion": [{"role": "assistant", "content": "Hello.\n\n[ZLT]"}]});
    assert_eq!(trained_text(&m, pos, LossMask::MarkerOnly { marker: marker.clone() }), "[ZLT]<|im_end|>");
    let neg = serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}],
                                 "completion": [{"role": "assistant", "content": "Hello."}]});
    assert_eq!(trained_text(&m, neg, LossMask::MarkerOnly { marker }), "<|im_end|>");
}

#[test]
fn marker_only_finds_the_marker_at_the_end_of_a_long_answer_in_linear_time() {
    // A 100 KB answer took 37 s when every prefix was decoded; now the test takes well under one.
    let m = model();
    let answer = "All good, café. ".repeat(6_000) + "\n\n[ZLT]";
    let row = serde_json::json!({"prompt": [{"role": "user", "content": "Hi"}],
                                 "completion": [{"role": "assistant", "content": answer}]});
    let ex =
        tokenize(&m.tokenizer, &row_from_json(row).unwrap(), &LossMask::MarkerOnly { marker: "[ZLT]".into() }, 100_000)
            .unwrap();
    let ids: Vec<u32> = ex.ids.iter().zip(&ex.target).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
    assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), "[ZLT]<|im_end|>");
}

#[test]
fn rows_of_the_wrong_shape_are_errors_that_say_what_is_wrong() {
    let err = row_from_json(serde_json::json!({"msgs": []})).unwrap_err().to_string();
    assert!(err.contains("none of the keys"), "{err}");
    let err =
        row_from_json(serde_json::json!({"messages": [{"role": "robot", "content": "x"}]})).unwrap_err().to_string();
    assert!(err.contains("role 'robot'"), "{err}");
}

#[test]
fn truncation_keeps_the_first_max_length_tokens() {
    let m = model();
    let row = row_from_json(serde_json::json!({"text": "one two three four five six seven"})).unwrap();
    let ex = tokenize(&m.tokenizer, &row, &LossMask::All, 3).unwrap();
    assert_eq!(ex.ids.len(), 3);
    assert_eq!(ex.target.len(), 3);
}

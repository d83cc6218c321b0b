"""Prompt encoding: a prompt longer than the text encoder reads is cut with a warning, never silently."""
import torch

from fastdrag.vae import encode_prompt


def test_a_prompt_past_the_encoders_length_is_cut_with_a_warning(tiny, caplog):
    tokenizer, encoder = tiny.tokenizer, tiny.text_encoder
    long_prompt = " ".join(["a red square on a blue background"] * 20)
    with caplog.at_level("WARNING", logger="fastdrag.vae"):
        short = encode_prompt(tokenizer, encoder, "a red square")
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="fastdrag.vae"):
        cut = encode_prompt(tokenizer, encoder, long_prompt)
    tokens = len(tokenizer(long_prompt, truncation=False).input_ids)
    assert tokens > 77 and f"the prompt is {tokens} tokens; the text encoder reads 77" in caplog.text
    assert short.shape == cut.shape == (1, 77, encoder.config.hidden_size)
    # the warning quotes the part that counts: the start of the prompt
    kept = caplog.text.split("so only ")[1].strip().strip("'")
    assert long_prompt.startswith(kept[:20])
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdrag.vae"):
        again = encode_prompt(tokenizer, encoder, [long_prompt, "a red square"])
    assert caplog.text.count("the prompt is") == 1
    torch.testing.assert_close(again[0], cut[0])
    torch.testing.assert_close(again[1], short[0])

"""The serving deployments as plain classes (no Ray): checkpoint kinds, request checks, and the
transformers completion path against transformers' own greedy generation."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.serve_app import TransformersCompletions, _pairs, checkpoint_kind, resolve_engine
from pipelines.errors import UserError


def test_checkpoint_kind(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    assert checkpoint_kind(str(tiny_model_dir)) == "policy"
    assert checkpoint_kind(str(tiny_reward_model_dir)) == "reward_model"
    with pytest.raises(UserError, match="no config.json"):
        checkpoint_kind(str(tmp_path))


def test_engine_choice():
    assert resolve_engine("auto") == "serve-llm"  # vLLM is installed here
    assert resolve_engine("transformers") == "transformers"
    with pytest.raises(UserError, match="engine 'tgi'"):
        resolve_engine("tgi")


@pytest.mark.parametrize("body,expected", [
    ({"prompt": "1+1="}, "response: a string or a non-empty list"),
    ({"prompt": ["a", "b"], "response": ["x"]}, "prompt has 2 items but response has 1"),
    ({"prompt": [1], "response": ["x"]}, "prompt: a string or a non-empty list"),
])
def test_score_request_errors_name_the_field(body, expected):
    with pytest.raises(ValueError, match=expected):
        _pairs(body)


def test_score_request_shapes():
    assert _pairs({"prompt": "1+1=", "response": "2"}) == (["1+1="], ["2"])


def test_transformers_completion_is_greedy_generation(tiny_model_dir):
    server = TransformersCompletions(str(tiny_model_dir), "tiny")
    out = server.complete({"prompt": ["12+7=", "3+4="], "max_tokens": 5, "temperature": 0})
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for choice, prompt in zip(out["choices"], ["12+7=", "3+4="], strict=True):
        ids = tok(prompt, return_tensors="pt")
        ref = model.generate(**ids, do_sample=False, max_new_tokens=5,
                             pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:]
        ref = ref.tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert choice["text"] == tok.decode(ref, skip_special_tokens=True)
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    with pytest.raises(ValueError, match="model: 'other' is not served here"):
        server.complete({"prompt": "1+1=", "model": "other"})
    with pytest.raises(ValueError, match="prompt: a string or a list of strings is required"):
        server.complete({"max_tokens": 3})

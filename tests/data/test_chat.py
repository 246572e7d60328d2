"""Chat fine-tuning data (``data.format=chat``): the loss covers exactly the assistant
replies, token by token, and a short run lowers the loss on them."""

import json

import pytest
import torch

from moe.data import DataSection, build_data, byte_tokenizer
from moe.data.batches import IGNORE
from moe.data.chat import PLAIN_TEMPLATE, ChatTemplate, pieces, tokenize_chats
from moe.train.trainer import Trainer
from moe.typed_config import ConfigError
from tests.train.helpers import small_config

CHATS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]

# ChatML with transformers' generation markers: its assistant mask is the reference.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
    "'<|im_end|>\\n' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def test_plain_template_trains_the_replies_and_their_end_marker():
    got = [pieces(chat, ChatTemplate(PLAIN_TEMPLATE)) for chat in CHATS]
    assert [text for text, trained in got[0] if trained] == ["Four.<|end|>\n", "Six.<|end|>\n"]
    assert got[1] == [("<|user|>\nHi\n<|assistant|>\n", False), ("Hello!<|end|>\n", True)]
    for chat, parts in zip(CHATS, got, strict=True):  # the pieces are the whole rendering
        assert "".join(text for text, _ in parts) == ChatTemplate(PLAIN_TEMPLATE).render(chat)


def test_mask_equals_transformers_assistant_mask_token_by_token():
    """Our flags against ``apply_chat_template(return_assistant_tokens_mask=True)`` on a
    tokenizer with special tokens, one conversation at a time."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHATML)
    for chat in CHATS:
        ids, trained = tokenize_chats([chat], tokenizer, ChatTemplate(CHATML))
        reference = hf.apply_chat_template(
            chat, return_dict=True, return_assistant_tokens_mask=True, tokenize=True
        )
        assert ids.tolist() == reference["input_ids"]
        assert trained.tolist() == [bool(m) for m in reference["assistant_masks"]]
        assert 0 < trained.sum() < len(trained)


def write_chats(path, n=40, seed=0):
    """Made-up arithmetic: ``prompt``/``response`` records and ``messages`` records."""
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        a, b = (int(v) for v in torch.randint(0, 10, (2,), generator=gen))
        if i % 2:
            lines.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
        else:
            messages = [
                {"role": "user", "content": f"{a}+{b}="},
                {"role": "assistant", "content": str(a + b)},
            ]
            lines.append({"messages": messages})
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def test_packed_targets_are_ignored_exactly_outside_replies(tmp_path):
    path = write_chats(tmp_path / "chat.jsonl")
    data = DataSection(path=str(path), format="chat", cache_dir=str(tmp_path / "c"))
    run = build_data(data, seq_len=16)
    ids, trained = tokenize_chats(
        [
            json.loads(line).get("messages")
            or [
                {"role": "user", "content": json.loads(line)["prompt"]},
                {"role": "assistant", "content": json.loads(line)["response"]},
            ]
            for line in path.read_text().splitlines()
        ],
        run.tokenizer,
        ChatTemplate(PLAIN_TEMPLATE),
    )
    inputs, targets = run.train.batch(torch.arange(run.train.count))
    stream = torch.from_numpy(ids.astype("int64"))
    flags = torch.from_numpy(trained)
    for row in range(run.train.count):  # target j is token j+1 of the window, kept iff trained
        window = slice(row * 16, row * 16 + 17)
        assert torch.equal(inputs[row], stream[window][:-1])
        expected = torch.where(flags[window][1:], stream[window][1:], IGNORE)
        assert torch.equal(targets[row], expected)
    assert run.train.trained_targets(torch.arange(run.train.count)) == (targets != IGNORE).sum()


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"text": "no chat here"}], "needs 'messages' .* or 'prompt' and 'response'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "a role among"),
        ([{"prompt": "hi", "response": None}], "string content"),
    ],
)
def test_bad_chat_records_are_one_line(tmp_path, records, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records * 3))
    with pytest.raises(ConfigError, match=message) as err:
        build_data(DataSection(path=str(path), format="chat"), seq_len=8)
    assert "\n" not in str(err.value)


def test_chat_run_lowers_the_reply_loss_whatever_the_micro_batch(tmp_path):
    """The loss is the mean over the global batch's reply tokens: micro-batches of 2 and 8
    give the same first-step loss; and a short run lowers the validation (reply) loss."""
    path = write_chats(tmp_path / "chat.jsonl", n=400)
    first = {}
    for micro in (2, 8):
        cfg = small_config(
            tmp_path,
            **{
                "data.path": str(path),
                "data.format": "chat",
                "data.val_fraction": 0.1,
                "train.micro_batch_size": micro,
                "train.max_steps": 1 if micro == 8 else 40,
                "optim.lr": 3e-3,
            },
        )
        trainer = Trainer(cfg, tmp_path / f"run{micro}")
        record, _ = trainer.train_step()
        first[micro] = record["lm_loss"]
        if micro == 2:
            summary = trainer.train()
            assert summary["val_loss"] < summary["val_loss_start"] - 0.5
            assert summary["trained_tokens_this_run"] > 0
        trainer.close()
    assert first[2] == pytest.approx(first[8], rel=1e-5)

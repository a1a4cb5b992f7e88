"""plt-complete --chat: the prompt as a user message, rendered with the model's chat template;
a model without one is a one-line error with exit code 2."""

import shutil

import pltkit
from pltkit.cli.complete import main
from pltkit.runtime.chat import ChatTemplate, prompt_ids

TEMPLATE = ("{% for m in messages %}<|file_sep|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|file_sep|>assistant\n{% endif %}")


def test_chat_without_a_template_is_one_line_and_exit_2(capsys):
    assert main(["--chat", "--backend", "torch", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plt-complete: ") and "has no chat template" in err[0]


def test_chat_prints_the_reply_to_the_rendered_conversation(tmp_path, capsys):
    import json

    d = tmp_path / "m"
    shutil.copytree(pltkit.__path__[0] + "/models/default", d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    argv = ["--model", str(d), "--backend", "torch", "--chat", "--system", "Be brief.", "--max-tokens", "6", "hi"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = prompt_ids(pltkit.load_tokenizer(d), ChatTemplate.from_dir(d).render(messages))
    assert out["tokens_evaluated"] + out["tokens_cached"] == len(ids) and len(out["tokens"]) <= 6
    assert main(argv) == 0 and capsys.readouterr().out == out["text"] + "\n"

"""The four prompt formats of templates/, each rendered on a row with and without input, and selectable by --template."""

import pytest

import main as main_mod
from utils import evaluation
from utils.prompter import Prompter

ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                     "Write a response that appropriately completes the request.\n\n")
ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
VIGOGNE_HEAD_INPUT = ("Ci-dessous se trouve une instruction qui décrit une tâche, accompagnée d'une entrée qui fournit un contexte "
                      "supplémentaire. Écrivez une réponse qui complète convenablement la demande.\n\n")
VIGOGNE_HEAD = "Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse qui complète convenablement la demande.\n\n"

# name: (with input, without input, response marker) for instruction "Name the colour." and input "the sky"
EXPECTED = {
    "alpaca": (ALPACA_HEAD_INPUT + "### Instruction:\nName the colour.\n\n### Input:\nthe sky\n\n### Response:\n",
               ALPACA_HEAD + "### Instruction:\nName the colour.\n\n### Response:\n", "### Response:"),
    "alpaca_legacy": (ALPACA_HEAD_INPUT + "### Instruction:\nName the colour.\n\n### Input:\nthe sky\n\n### Response:",
                      ALPACA_HEAD + "### Instruction:\nName the colour.\n\n### Response:", "### Response:"),
    "alpaca_short": ("### Instruction:\nName the colour.\n\n### Input:\nthe sky\n\n### Response:\n",
                     "### Instruction:\nName the colour.\n\n### Response:\n", "### Response:"),
    "vigogne": (VIGOGNE_HEAD_INPUT + "### Instruction:\nName the colour.\n\n### Entrée:\nthe sky\n\n### Réponse:\n",
                VIGOGNE_HEAD + "### Instruction:\nName the colour.\n\n### Réponse:\n", "### Réponse:"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_rows_with_and_without_input(name):
    with_input, without_input, marker = EXPECTED[name]
    p = Prompter(name)
    assert p.generate_prompt("Name the colour.", "the sky") == with_input
    assert p.generate_prompt("Name the colour.") == without_input
    # a training row appends the label; the response is what follows the marker
    assert p.get_response(p.generate_prompt("Name the colour.", "the sky", label="blue")) == "blue"
    assert p.template["response_split"] == marker


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_is_selected_by_flag(name, tmp_path, tiny_base):
    data = tmp_path / "d.json"
    data.write_text('[{"inputs": "Name the colour.", "targets": "blue", "task": "t", "domain": "d", "metric": "em"}]')
    args = main_mod.parse_settings(["--data_path", str(data), "--res_path", str(tmp_path / "r.json"), "--eval_type", "base",
                                    "--base_model", str(tiny_base), "--device", "cpu", "--template", name])
    plan = evaluation.prepare(args)
    assert plan.prompter.name == name and plan.settings["template"] == name
    assert plan.prompter.generate_prompt(plan.rows[0]["inputs"]) == EXPECTED[name][1]

"""Property-based tests: malformed input files end in the project's own error, naming the file, and nothing else.

Every loader of a user-supplied file (data rows, pool configs, prompt templates, settings files, results files,
adapter configs) gets generated documents: wrong types, missing and extra keys, odd unicode, huge numbers, wrong
nesting, truncated text and raw bytes. A document is either accepted or refused with :class:`InputError` whose
message names the file; any other exception fails the test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.data import InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["", " ", "\u0000", "\ud7ff\ufeff", "💥", "em", "rouge", "bleu", "{name}", "{", "}", "{instruction}"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)

ROW_KEYS = ["inputs", "targets", "task", "domain", "metric", "extra"]
row_like = st.dictionaries(st.sampled_from(ROW_KEYS), json_values, max_size=6) | st.fixed_dictionaries(
    {k: st.one_of(st.text(max_size=20), json_values) for k in ROW_KEYS[:5]})
POOL_KEYS = ["model_name", "domain", "sample", "path", "metric"]
sample_like = st.one_of(st.text(max_size=20), st.dictionaries(st.sampled_from(["inputs", "targets"]), json_values, max_size=2), json_values)
pool_entry_like = st.dictionaries(st.sampled_from(POOL_KEYS), st.one_of(json_values, st.lists(sample_like, max_size=3)), max_size=5)


def documents(element):
    """A whole file's text: a list of elements, an element alone, any JSON, or one of those cut short."""
    whole = st.one_of(st.lists(element, max_size=4), element, json_values).map(lambda v: json.dumps(v, allow_nan=True))
    return st.one_of(whole, st.tuples(whole, st.integers(min_value=0, max_value=200)).map(lambda t: t[0][: t[1]]))


raw_bytes = st.binary(max_size=64)


def write(content) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    p = d / "file.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return p


def accepted_or_input_error(load, path: Path):
    try:
        load(path)
    except InputError as err:
        assert str(path) in str(err) or path.name in str(err), f"the message does not name the file: {err}"


@SETTINGS
@given(st.one_of(documents(row_like), raw_bytes))
def test_data_rows(content):
    from utils.data import load_rows

    accepted_or_input_error(load_rows, write(content))


@SETTINGS
@given(st.one_of(documents(pool_entry_like), raw_bytes), st.booleans())
def test_pool_configs(content, check_paths):
    from utils.data import load_pool_config

    accepted_or_input_error(lambda p: load_pool_config(p, adapter_pattern="{name}" if not check_paths else None, check_paths=check_paths),
                            write(content))


TEMPLATE_KEYS = ["description", "prompt_input", "prompt_no_input", "response_split", "other"]


@SETTINGS
@given(st.one_of(st.dictionaries(st.sampled_from(TEMPLATE_KEYS), json_values, max_size=5).map(json.dumps), documents(json_values), raw_bytes))
def test_prompt_templates(content):
    from utils.prompter import Prompter

    def load(p):
        prompter = Prompter(str(p))
        prompter.generate_prompt("an instruction")  # an accepted template must render
        prompter.generate_prompt("an instruction", "an input")

    accepted_or_input_error(load, write(content))


@SETTINGS
@given(st.one_of(st.dictionaries(st.sampled_from(["lora_num", "eval_type", "base_model", "temperature", "ood", "runs", "weighting",
                                                  "max_new_tokens", "_comment", "unknown_key"]), json_values, max_size=5).map(json.dumps),
                 documents(json_values), raw_bytes))
def test_settings_files(content):
    import main as main_mod
    from utils import evaluation
    from utils.flags import read_settings_file

    parser = main_mod.build_parser()

    path = write(content)
    try:
        accepted_or_input_error(lambda p: read_settings_file(str(p), parser), path)
        try:
            values = read_settings_file(str(path), parser)
        except InputError:
            return
        parser.set_defaults(**values)
        args = parser.parse_args(["--data_path", "d.json", "--res_path", "r.json"])
        try:
            evaluation.validate(args)  # values of the right type, out of range: the flag checks refuse them, by flag name
        except InputError:
            pass
    finally:
        parser.set_defaults(**{a.dest: a.default for a in main_mod.build_parser()._actions})


@SETTINGS
@given(st.one_of(st.dictionaries(st.sampled_from(["settings", "meta", "rows", "format"]),
                                 st.one_of(json_values, st.lists(row_like, max_size=3)), max_size=4).map(json.dumps),
                 documents(row_like), raw_bytes))
def test_results_files(content):
    from utils.results import load_results

    accepted_or_input_error(load_results, write(content))


@SETTINGS
@given(st.one_of(st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules"]),
                                 st.one_of(json_values, st.sampled_from(["LORA", "lora", "PREFIX_TUNING", "IA3"])), max_size=4).map(json.dumps),
                 documents(json_values), raw_bytes))
def test_adapter_configs(content):
    from utils.data import check_adapter_config

    accepted_or_input_error(lambda p: check_adapter_config(p, f"adapter at {p.parent}"), write(content))


@pytest.mark.parametrize("text", ['[{"inputs": "a", "targets": "b", "task": "t", "domain": "d", "metric": "em"}]'])
def test_every_truncation_of_a_valid_data_file(text):
    """All prefixes of a valid file: accepted only when whole, otherwise a clear refusal."""
    from utils.data import load_rows

    for cut in range(len(text)):
        path = write(text[:cut])
        with pytest.raises(InputError, match="file.json"):
            load_rows(path)
    assert load_rows(write(text))[0]["task"] == "t"

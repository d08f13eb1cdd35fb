import json

import pytest

from gapray.config import MeasureConfig, load_config
from gapray.errors import UserError
from gapray.prompts import load_prompts


def write(path, text):
    path.write_text(text)
    return path


def test_geneval_jsonl(tmp_path):
    p = write(tmp_path / "g.jsonl", "\n".join(json.dumps(o) for o in [
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
        {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
         "position": ["left of", 0]}], "prompt": "a photo of a cat left of a dog", "prompt_id": "x7"},
    ]) + "\n\n")
    rows = load_prompts(p)
    assert [(r.prompt_id, r.task, r.prompt) for r in rows] == [
        ("g-00001", "colors", "a photo of a red car"), ("x7", "position", "a photo of a cat left of a dog")]
    assert rows[1].meta["include"][1]["position"] == ["left of", 0]
    assert len(load_prompts(p, limit=1)) == 1


def test_text_list_task_from_stem_or_override(tmp_path):
    p = write(tmp_path / "color_val.txt", "# T2I-CompBench style\na red apple\n\n a blue bird \n")
    rows = load_prompts(p)
    assert [(r.task, r.prompt) for r in rows] == [("color_val", "a red apple"), ("color_val", "a blue bird")]
    assert {r.task for r in load_prompts(p, task="color")} == {"color"}
    assert len({r.prompt_id for r in rows}) == 2


@pytest.mark.parametrize("line,needle", [
    ('{"tag": "colors", "prompt": "x"', "g.jsonl:2: not valid JSON"),
    ('["a"]', "g.jsonl:2: expected a JSON object"),
    ('{"tag": "colors\t", "prompt": "x"}', "g.jsonl:2: not valid JSON (Invalid control character at column 16)"),
    ('{"tag": "colors", "include": [], "prompt": "x"}', "g.jsonl:2: 'include' must be a non-empty list"),
    ('{"tag": "colors", "include": [{"count": 1}], "prompt": "x"}', "g.jsonl:2: include[0] needs a 'class'"),
    ('{"tag": "c", "include": [{"class": "a", "count": 0}], "prompt": "x"}', "'count' must be an integer >= 1"),
    ('{"tag": "c", "include": [{"class": "a"}, {"class": "b", "position": ["near", 0]}], "prompt": "x"}',
     "'position' must be [relation, index]"),
    ('{"include": [{"class": "a"}], "prompt": "x"}', "g.jsonl:2: 'tag' must be a non-empty string"),
])
def test_malformed_geneval_line_names_file_and_line(tmp_path, line, needle):
    good = '{"tag": "single_object", "include": [{"class": "a", "count": 1}], "prompt": "a photo of an a"}'
    p = write(tmp_path / "g.jsonl", good + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        load_prompts(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="must end in .jsonl"):
        load_prompts(write(tmp_path / "p.csv", "a,b\n"))
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(write(tmp_path / "empty.txt", "# nothing\n"))


def test_config_layers_and_presets(tmp_path):
    y = write(tmp_path / "c.yaml", "images_per_prompt: 6\nsampling:\n  temperature: 0.9\nmodel: janus-pro-7b\n")
    cfg = load_config(MeasureConfig, y, ["sampling.guidance_scale=3", "seed=4"])
    assert cfg.images_per_prompt == 6 and cfg.sampling.temperature == 0.9 and cfg.sampling.guidance_scale == 3
    assert cfg.model.path == "deepseek-community/Janus-Pro-7B" and cfg.model.dtype == "bfloat16"
    cfg = load_config(MeasureConfig, y, ["model=janus-pro-1b", "images_per_prompt=8"])
    assert cfg.model.path == "deepseek-community/Janus-Pro-1B" and cfg.images_per_prompt == 8
    cfg = load_config(MeasureConfig, None, ["model=/some/dir", "model.dtype=bfloat16"])
    assert cfg.model.path == "/some/dir" and cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("override,needle", [
    ("images_per_promt=3", "unknown config key 'images_per_promt' (did you mean 'images_per_prompt'?)"),
    ("sampling.temprature=1", "unknown config key 'sampling.temprature' (did you mean 'sampling.temperature'?)"),
    ("images_per_prompt=abc", "config key 'images_per_prompt': expected int"),
    ("sampling.guidance_scale=1", "'sampling.guidance_scale': must be > 1"),
    ("sampling.guidance_scale=0.5", "'sampling.guidance_scale': must be > 1"),
    ("images_per_prompt=0", "'images_per_prompt': must be >= 1"),
    ("scoring.mode=logit", "'logit' is not one of logits, generate (did you mean 'logits'?)"),
    ("scoring.threshold=1.5", "'scoring.threshold': must be in [0, 1]"),
    ("model.dtype=fp8", "'model.dtype': 'fp8' is not one of"),
    ("sampling.top_p=0", "'sampling.top_p': must be in (0, 1]"),
    ("backend=spark", "'backend': 'spark' is not one of"),
    ("seed", "must look like key=value"),
    ("sampling.top_p=[0.9", "override 'sampling.top_p=[0.9': the value is not valid YAML"),
])
def test_bad_config_is_one_clear_line(override, needle):
    with pytest.raises(UserError) as e:
        load_config(MeasureConfig, None, [override])
    assert needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file .* not found"):
        load_config(MeasureConfig, tmp_path / "nope.yaml", [])


def test_config_file_that_is_not_yaml_is_one_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "seed: 1\nimages_per_prompt: [2\nsampling: {}\n")
    with pytest.raises(UserError) as e:
        load_config(MeasureConfig, bad, [])
    assert str(e.value).startswith(f"config file {bad}:3:") and "not valid YAML" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)

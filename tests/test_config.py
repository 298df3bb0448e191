"""Options validation, modes, and finding the backend by name."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from prhs_compile import PrHSConfig, available_policies
from prhs_compile.backend import prhs_backend


def test_defaults_are_valid_and_documented():
    config = PrHSConfig()
    assert config.policy in available_policies()
    for field in ("policy", "budget", "sink", "local", "tau", "dilation_m", "dilation_r", "max_reuse", "min_context", "debug", "verify", "inductor"):
        assert hasattr(config, field)
        assert f"{field}:" in PrHSConfig.__doc__, field


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bugdet": 64}, "unknown prhs option(s) ['bugdet']"),
        ({"policy": "quest-ish"}, "policy='quest-ish' is invalid: expected one of"),
        ({"budget": 0}, "budget=0 is invalid: expected >= 1"),
        ({"budget": "64"}, "budget='64' is invalid: expected a value of type int"),
        ({"tau": 1.5}, "tau=1.5 is invalid: expected in [-1.0, 1.0]"),
        ({"sink": -1}, "sink=-1 is invalid: expected >= 0"),
        ({"budget": 16, "sink": 8, "local": 16}, "sink=8 + local=16 exceed budget=16"),
        ({"policy": "oracle", "budget": 16, "sink": 8, "local": 8}, "leaves no room for retrieved positions"),
        ({"debug": 1}, "debug=1 is invalid: expected a value of type bool"),
        ({"max_reuse": 0}, "max_reuse=0 is invalid: expected >= 1"),
        ({"dilation_m": -2}, "dilation_m=-2 is invalid: expected >= 0"),
        ({"max_decode_query_len": 0}, "max_decode_query_len=0 is invalid"),
        ({"mode": "fastest"}, "mode='fastest' is invalid"),
        ({"layer_tau": {"5": 1.5}}, "layer_tau={5: 1.5} is invalid: expected a layer >= 0 mapped to a tau in [-1, 1]"),
        ({"layer_tau": [0.8]}, "layer_tau=[0.8] is invalid: expected a dict {layer: tau}"),
    ],
)
def test_bad_options_raise_naming_key_and_allowed_values(options, message):
    with pytest.raises(ValueError) as err:
        PrHSConfig.from_options(options)
    assert message in str(err.value)


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _qkv():
    return [torch.randn(1, 2, 4, 8) for _ in range(3)]


def test_bad_option_fails_the_compile_with_the_same_message():
    compiled = torch.compile(_sdpa, backend="prhs", options={"budget": -3})
    with pytest.raises(Exception, match=r"budget=-3 is invalid: expected >= 1"):
        compiled(*_qkv())


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match=r"unknown mode='turbo'; valid modes are"):
        prhs_backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], mode="turbo")


def test_mode_with_eager_inner_compiler_is_rejected():
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(ValueError, match=r"mode='reduce-overhead' configures Inductor, but options set inductor=False"):
        prhs_backend(gm, [], mode="reduce-overhead", options={"inductor": False})
    with pytest.raises(ValueError, match=r"configures Inductor"):
        prhs_backend(gm, [], options={"inductor": False, "mode": "max-autotune"})


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_known_modes_compile(mode):
    compiled = torch.compile(_sdpa, backend="prhs", mode=mode)
    q, k, v = _qkv()
    torch.testing.assert_close(compiled(q, k, v), _sdpa(q, k, v))


def test_backend_is_found_by_name_without_importing_the_package():
    code = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q),
                          backend="prhs", options={"inductor": False})
        f(torch.randn(1, 2, 3, 4))
        print("prhs_compile" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("True")


def test_source_checkout_kernels_folder_does_not_shadow_the_ops():
    """From the repository root our ``kernels/`` folder is importable as a top-level
    ``kernels``. It must then register nothing, and hand the name to the Hugging Face
    ``kernels`` package when that is installed (transformers 5.25 and later import it)."""
    import importlib.machinery

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import prhs_compile

    if not os.path.abspath(prhs_compile.__file__).startswith(root):
        pytest.skip("prhs_compile is installed as a regular package: its source root is not importable")
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    installed = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    code = (
        "import kernels, torch, prhs_compile, transformers.activations\n"
        "print(kernels.__file__, torch.ops.prhs.select.default.name())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    where, op = out.stdout.split()
    assert op == "prhs::select"
    if installed is None:
        assert where == os.path.join(root, "kernels", "__init__.py")
    else:
        assert where == installed.origin


def test_layer_tau_overrides_tau_for_the_layers_it_names(tmp_path):
    config = PrHSConfig(tau=0.8, layer_tau={"1": 0.5})
    assert config.select_plan(1).tau == 0.5 and config.select_plan(0).tau == 0.8
    calibration = tmp_path / "cal.json"
    calibration.write_text('{"suggested_tau": {"0": 0.9}}')
    assert PrHSConfig(layer_tau=str(calibration)).select_plan(0).tau == 0.9
    with pytest.raises(ValueError, match="a calibration JSON with a 'suggested_tau' map"):
        calibration.write_text("{}")
        PrHSConfig(layer_tau=str(calibration))

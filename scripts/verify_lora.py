"""Prove that this Python environment can load a model in 8 bits and LoRA-train it.

Runs with the environment's own Python and only its packages plus the standard library; never touches a model hub
(HF_HUB_OFFLINE=1: the tiny Llama model is created here, from random weights).

    python verify_lora.py [--json] [--report FILE] [--steps N] [--driver-cuda X.Y] [--device cpu|cuda]
                          [--int8-min-cc 7.5] [--accelerate-min V] [--bitsandbytes-min V]   (lorastrap passes these
                          from envs/profiles.yaml)

Exit codes: 0 every required check passed; 1 a required check failed; 3 this environment cannot do 8-bit on this
machine (e.g. a CUDA-only bitsandbytes on a CPU-only machine) — said in plain words, not a failure of the
environment; 2 usage.  The JSON report (schema_version 1) lists every check with its status, time, and for a
failure the likely cause and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback

SCHEMA_VERSION = 1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "numpy"]
REQUIRED = ["torch", "transformers", "peft", "accelerate", "bitsandbytes"]

# What users see when a package is missing or too old, and what to do about it.
MISSING = {
    "accelerate": ("ImportError: Using `bitsandbytes` 8-bit quantization requires accelerate: "
                   "pip install 'accelerate>={accel}' (older transformers: \"Using `load_in_8bit=True` requires "
                   "Accelerate: `pip install accelerate` and the latest version of bitsandbytes\")",
                   "accelerate is not installed in this environment (or cannot be imported)",
                   "install the profile's accelerate (`lorastrap repair`), or `pip install 'accelerate>={accel}'`"),
    "bitsandbytes": ("ImportError: Using `bitsandbytes` 8-bit quantization requires bitsandbytes: "
                     "pip install -U bitsandbytes>={bnb}",
                     "bitsandbytes is not installed in this environment (or cannot be imported)",
                     "reinstall the environment (`lorastrap repair`), or `pip install -U 'bitsandbytes>={bnb}'`"),
    "peft": ("ModuleNotFoundError: No module named 'peft'", "peft is not installed in this environment",
             "reinstall the environment (`lorastrap repair`), or `pip install peft`"),
    "torch": ("ModuleNotFoundError: No module named 'torch'", "PyTorch is not installed in this environment",
              "reinstall the environment (`lorastrap repair`)"),
    "transformers": ("ModuleNotFoundError: No module named 'transformers'", "transformers is not installed",
                     "reinstall the environment (`lorastrap repair`)"),
}


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.info: dict = {"schema_version": SCHEMA_VERSION, "python": platform.python_version(),
                           "executable": sys.executable, "platform": platform.platform(), "versions": {}}
        self.unsupported: str | None = None

    def add(self, name: str, status: str, detail: str = "", *, required: bool = True, cause: str = "",
            fix: str = "", error: str = "", seconds: float | None = None, **data) -> dict:
        check = {"name": name, "status": status, "required": required, "detail": detail}
        if status in ("fail", "warn", "unsupported"):
            check.update({k: v for k, v in (("error", error), ("cause", cause), ("fix", fix)) if v})
        if seconds is not None:
            check["seconds"] = round(seconds, 3)
        check.update(data)
        self.checks.append(check)
        return check

    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["required"] and c["status"] == "fail"]

    def finish(self) -> dict:
        if self.failed():
            verdict, code = "fail", 1
        elif self.unsupported:
            verdict, code = "unsupported", 3
        else:
            verdict, code = "pass", 0
        return {**self.info, "ok": code == 0, "verdict": verdict, "exit_code": code,
                "unsupported_reason": self.unsupported, "checks": self.checks}


def _numbers(text: str) -> tuple:
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _version(text: str):
    """A comparable version of a PyPI release (torch 2.5.1+cu124), a CUDA version (12.4) or a compute capability
    (8.9).  This script runs inside the environment under test, with its standard library and ML stack only — not
    lorastrap's runtime, so not lorastrap's core/versions.py: packaging's Version (PEP 440) where the environment
    has packaging (transformers, accelerate and peft all require it), else the leading dotted numbers as a tuple.
    Either way every value in one run is of the same kind."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _numbers(text)
    try:
        return Version(text)
    except InvalidVersion:
        return Version(".".join(map(str, _numbers(text))) or "0")


def _dist_version(name: str) -> str:
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:
        return "?"


def distributions() -> dict:
    """Every distribution this Python sees, by normalized name (PEP 503): what `lorastrap explain` judges by."""
    import re
    from importlib import metadata
    out = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] if dist.metadata else None) or ""
        if name:
            out.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return dict(sorted(out.items()))


def _quiet():
    """Silence library chatter (bitsandbytes prints to stderr even when all is well: not a failure signal)."""
    return contextlib.redirect_stderr(io.StringIO())


# ------------------------------------------------------------------------------------------------------------
# Pre-checks

def check_imports(rep: Report, mods: dict, facts: argparse.Namespace) -> None:
    import importlib
    accel_min, bnb_min = facts.accelerate_min or "?", facts.bitsandbytes_min or "?"
    for name in PACKAGES:
        start = time.perf_counter()
        try:
            with _quiet():
                mod = importlib.import_module(name)
            mods[name] = mod
            rep.info["versions"][name] = getattr(mod, "__version__", None) or _dist_version(name)
            rep.add(f"import {name}", "pass", rep.info["versions"][name], required=name in REQUIRED,
                    seconds=time.perf_counter() - start)
        except Exception as exc:  # ImportError, or anything an import can raise
            rep.info["versions"][name] = None
            error, cause, fix = MISSING.get(name, (f"{type(exc).__name__}: {exc}", f"{name} cannot be imported",
                                                   "reinstall the environment"))
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            if missing and missing.split(".")[0] not in (name, "pkg_resources", "scipy"):
                error = f"ModuleNotFoundError: No module named '{missing}'"
                cause, fix = (f"{name} is installed but imports {missing.split('.')[0]}, which is missing",
                              f"install {missing.split('.')[0]} (the version {name} requires)")
            elif "pkg_resources" in str(exc):
                cause, fix = ("this package imports pkg_resources, which setuptools >= 81 no longer provides",
                              "install setuptools<81 in the environment")
            elif "scipy" in str(exc):
                cause, fix = "this bitsandbytes needs scipy, which it does not declare", "install scipy"
            rep.add(f"import {name}", "fail" if name in REQUIRED else "warn", detail, required=name in REQUIRED,
                    error=error.format(accel=accel_min, bnb=bnb_min), cause=cause,
                    fix=fix.format(accel=accel_min, bnb=bnb_min), seconds=time.perf_counter() - start)


def check_transformers_gates(rep: Report, mods: dict, facts: argparse.Namespace) -> None:
    tr = mods.get("transformers")
    if tr is None:
        return
    try:
        from transformers.utils import import_utils
    except Exception:
        return
    # The installed transformers' own minimums first; the facts lorastrap passes when it does not say them.
    accel_min = getattr(import_utils, "ACCELERATE_MIN_VERSION", None) or facts.accelerate_min
    bnb_min = getattr(import_utils, "BITSANDBYTES_MIN_VERSION", None) or facts.bitsandbytes_min
    gates = [("accelerate", "is_accelerate_available", accel_min,
              "Using `bitsandbytes` 8-bit quantization requires accelerate: pip install 'accelerate>={v}'"),
             ("bitsandbytes", "is_bitsandbytes_available", bnb_min,
              "Using `bitsandbytes` 8-bit quantization requires bitsandbytes: pip install -U bitsandbytes>={v}")]
    for pkg, fn_name, min_v, message in gates:
        fn = getattr(import_utils, fn_name, None)
        if fn is None or pkg not in mods:
            continue  # a missing package is reported by its import check
        with _quiet():
            ok = bool(fn())
        have = rep.info["versions"].get(pkg)
        if ok:
            rep.add(f"transformers accepts {pkg}", "pass", f"{pkg} {have}" + (f" >= {min_v}" if min_v else ""))
        else:
            old = min_v and have and _version(have) < _version(min_v)
            rep.add(f"transformers accepts {pkg}", "fail",
                    f"transformers {rep.info['versions']['transformers']} rejects {pkg} {have}",
                    error="ImportError: " + message.format(v=min_v or "?"),
                    cause=(f"{pkg} {have} is older than the {min_v} this transformers requires" if old else
                           f"transformers' {fn_name}() returned False"),
                    fix=f"install the profile's set (`lorastrap repair`), or `pip install -U '{pkg}>={min_v}'`")


def check_devices(rep: Report, mods: dict, driver_cuda: str | None, int8_min_cc: str | None) -> str:
    torch = mods.get("torch")
    if torch is None:
        return "cpu"
    tinfo = {"version": torch.__version__, "cuda_build": getattr(torch.version, "cuda", None),
             "cudnn": None, "cuda_available": False, "devices": ["cpu"]}
    try:
        tinfo["cuda_available"] = bool(torch.cuda.is_available())
        if tinfo["cuda_available"]:
            tinfo["cudnn"] = torch.backends.cudnn.version()
            for i in range(torch.cuda.device_count()):
                cc = torch.cuda.get_device_capability(i)
                tinfo["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                         "compute_capability": f"{cc[0]}.{cc[1]}",
                                         "memory_mib": torch.cuda.get_device_properties(i).total_memory // 2**20})
    except Exception as exc:
        tinfo["cuda_error"] = str(exc).splitlines()[0]
    rep.info["torch"] = tinfo
    build = tinfo["cuda_build"]
    if build and driver_cuda:
        if _numbers(build)[:1] > _numbers(driver_cuda)[:1]:
            rep.add("torch CUDA build vs driver", "fail", f"torch built for CUDA {build}, driver supports {driver_cuda}",
                    error="RuntimeError: The NVIDIA driver on your system is too old (found version "
                          f"{driver_cuda.replace('.', '')}0)",
                    cause="PyTorch's CUDA major version is newer than the driver supports",
                    fix="upgrade the NVIDIA driver, or install the profile lorastrap plans for this driver")
        elif _version(build) > _version(driver_cuda):
            rep.add("torch CUDA build vs driver", "warn",
                    f"torch built for CUDA {build}, driver supports {driver_cuda}: runs under minor-version "
                    f"compatibility (limited feature set; newer PTX fails)", required=False,
                    cause="driver older than the CUDA minor version", fix="upgrade the driver when you can")
        else:
            rep.add("torch CUDA build vs driver", "pass", f"torch CUDA {build} <= driver CUDA {driver_cuda}")
    elif build and not tinfo["cuda_available"]:
        rep.add("torch CUDA build vs driver", "warn", f"torch built for CUDA {build} but no CUDA device is usable"
                + (f" ({tinfo['cuda_error']})" if tinfo.get("cuda_error") else ""), required=False,
                cause="no NVIDIA GPU or driver on this machine", fix="none needed for a CPU run")
    for dev in tinfo["devices"][1:] if int8_min_cc else []:
        if _version(dev["compute_capability"]) < _version(int8_min_cc):
            rep.add(f"GPU {dev['index']} int8 fast path", "warn",
                    f"{dev['name']} has compute capability {dev['compute_capability']} < {int8_min_cc}: "
                    "LLM.int8() takes the slow path", required=False,
                    cause=f"bitsandbytes' int8 matmul kernels need compute capability >= {int8_min_cc}",
                    fix="expect slower 8-bit inference; 8-bit optimizers and LoRA still work")
    return "cuda" if tinfo["cuda_available"] else "cpu"


def check_bnb_backend(rep: Report, mods: dict, device: str) -> None:
    bnb = mods.get("bitsandbytes")
    if bnb is None:
        return
    supported = sorted(getattr(bnb, "supported_torch_devices", []) or [])
    native = None
    try:
        from bitsandbytes import cextension
        lib = getattr(cextension, "lib", None)
        native = getattr(getattr(lib, "lib", None), "_name", None) or getattr(lib, "_name", None)
    except Exception:
        pass
    rep.info["bitsandbytes"] = {"supported_devices": supported, "native_library": native}
    if not supported:
        # Before 0.46 bitsandbytes was CUDA-only and had no multi-backend registry.
        if device == "cpu":
            rep.unsupported = (f"bitsandbytes {rep.info['versions']['bitsandbytes']} is CUDA-only: it quantizes "
                               "weights only when a model moves to a CUDA GPU, so 8-bit loading cannot work on this "
                               "CPU-only machine. Run this profile on a machine with an NVIDIA GPU, or use the cpu "
                               "profile (bitsandbytes >= 0.48 has a CPU backend).")
            rep.add("bitsandbytes backend for this device", "unsupported", "CUDA-only bitsandbytes, no GPU here",
                    required=False, cause="bitsandbytes < 0.46 has no CPU backend",
                    fix="use a CUDA machine, or the cpu profile")
        else:
            rep.add("bitsandbytes backend for this device", "pass", "CUDA (bitsandbytes < 0.46, CUDA-only)")
        return
    try:
        from transformers.integrations import validate_bnb_backend_availability
        with _quiet():
            validate_bnb_backend_availability(raise_exception=True)
        rep.add("bitsandbytes backend for this device", "pass", f"{device} in {supported}; native library {native}")
    except ImportError:
        ok = device in supported
        rep.add("bitsandbytes backend for this device", "pass" if ok else "fail", f"{device} vs {supported}",
                cause="bitsandbytes has no backend for this device", fix="install a bitsandbytes build for it")
    except Exception as exc:
        rep.add("bitsandbytes backend for this device", "fail", str(exc).splitlines()[0][:300],
                error=f"RuntimeError: {str(exc).splitlines()[0][:300]}",
                cause="the installed bitsandbytes has no backend for any device torch can use",
                fix="install the bitsandbytes build of the profile lorastrap plans (`lorastrap repair`)")


# ------------------------------------------------------------------------------------------------------------
# Functional checks

def _timed(rep: Report, name: str, fn, *, required: bool = True, cause: str = "", fix: str = ""):
    start = time.perf_counter()
    try:
        with _quiet():
            result = fn()
        status, detail, data = result
        return rep.add(name, status, detail, required=required, seconds=time.perf_counter() - start,
                       cause=cause if status == "fail" else "", fix=fix if status == "fail" else "", **data)
    except Exception as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return rep.add(name, "fail", last[:400], required=required, error=last[:400], cause=cause, fix=fix,
                       seconds=time.perf_counter() - start)


def run_functional(rep: Report, mods: dict, device: str, steps: int) -> None:
    import torch
    import bitsandbytes as bnb
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(1)
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    state: dict = {}

    def int8_layer():
        ref = torch.nn.Linear(64, 64, bias=False)
        x = torch.randn(8, 64)
        want = ref(x)
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.load_state_dict(ref.state_dict())
        layer = layer.to(dev)
        layer.eval()
        with torch.no_grad():
            got = layer(x.to(dev).to(torch.float16 if device == "cuda" else torch.float32)).float().cpu()
        rel = ((got - want).norm() / want.norm()).item()
        ok = layer.weight.dtype == torch.int8 and rel < 0.05
        return ("pass" if ok else "fail", f"weight {layer.weight.dtype}, relative error vs fp32 {rel:.4f} (limit 0.05)",
                {"relative_error": rel})

    def load_8bit():
        from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)
        torch.manual_seed(0)
        ref = LlamaForCausalLM(cfg)
        path = os.path.join(state["tmp"], "tiny-llama")
        ref.save_pretrained(path)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        ref.eval()
        with torch.no_grad():
            want = ref(ids).logits
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map={"": dev})
        model.eval()
        with torch.no_grad():
            got = model(ids.to(dev)).logits.float().cpu()
        int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        all_int8 = all(m.weight.dtype == torch.int8 for m in int8)
        rel = ((got - want).norm() / want.norm()).item()
        state.update(model=model, ids=ids, path=path, cfg=cfg)
        expect = cfg.num_hidden_layers * 7
        ok = len(int8) == expect and all_int8 and rel < 0.1
        return ("pass" if ok else "fail", f"{len(int8)} Linear8bitLt layers (expected {expect}), int8 weights: "
                f"{all_int8}, footprint {model.get_memory_footprint()} B, logits relative error {rel:.4f}",
                {"int8_layers": len(int8), "footprint_bytes": model.get_memory_footprint(), "relative_error": rel})

    def lora_train():
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(state["model"])
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        int8_before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                       if isinstance(m, bnb.nn.Linear8bitLt)}
        lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = state["ids"].to(dev)
        model.train()
        losses = []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
        elapsed = time.perf_counter() - start
        frozen = all(torch.equal(m.weight, int8_before[n]) for n, m in model.named_modules() if n in int8_before)
        changed = sum(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
        state["peft_model"] = model
        data = {"losses": losses, "trainable_params": trainable, "steps_per_s": round(steps / elapsed, 2)}
        if device == "cuda":
            data["peak_memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
        ok = losses[-1] < losses[0] and frozen and changed == len(lora_before) and trainable > 0
        return ("pass" if ok else "fail", f"{steps} steps, loss {losses[0]} -> {losses[-1]}, int8 weights "
                f"unchanged: {frozen}, LoRA tensors changed: {changed}/{len(lora_before)}, "
                f"{trainable} trainable params", data)

    def adapter_roundtrip():
        from peft import PeftModel
        from transformers import BitsAndBytesConfig, LlamaForCausalLM
        model = state["peft_model"]
        model.eval()
        ids = state["ids"].to(dev)
        with torch.no_grad():
            want = model(input_ids=ids).logits.float().cpu()
        adapter = os.path.join(state["tmp"], "adapter")
        model.save_pretrained(adapter)
        base = LlamaForCausalLM.from_pretrained(state["path"], quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map={"": dev})
        again = PeftModel.from_pretrained(base, adapter)
        again.eval()
        with torch.no_grad():
            got = again(input_ids=ids).logits.float().cpu()
        diff = (got - want).abs().max().item()
        return ("pass" if diff <= 1e-5 else "fail", f"adapter saved and reloaded: max logit difference {diff:.2e}",
                {"max_abs_diff": diff})

    def adamw8bit():
        p = torch.nn.Parameter(torch.randn(64, 128, device=dev))
        before = p.detach().clone()
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        (p ** 2).sum().backward()
        opt.step()
        st = opt.state[p]
        dtypes = sorted({str(v.dtype) for v in st.values() if hasattr(v, "dtype")})
        ok = not torch.equal(p.detach(), before) and "torch.uint8" in dtypes
        return ("pass" if ok else "fail", f"one step; state dtypes {dtypes}", {})

    with tempfile.TemporaryDirectory(prefix="verify-lora-") as tmp:
        state["tmp"] = tmp
        _timed(rep, "int8 layer vs fp32", int8_layer,
               cause="bitsandbytes' int8 kernels do not work on this device",
               fix="reinstall the profile's bitsandbytes build (`lorastrap repair`)")
        c = _timed(rep, "tiny Llama loads in 8 bits", load_8bit,
                   cause="transformers could not quantize the model with bitsandbytes",
                   fix="check the pre-checks above; reinstall the profile's set")
        if c["status"] == "pass":
            c = _timed(rep, f"LoRA trains ({steps} steps)", lora_train,
                       cause="peft LoRA training on the 8-bit model failed", fix="reinstall the profile's set")
            if c["status"] == "pass":
                _timed(rep, "LoRA adapter save and reload", adapter_roundtrip,
                       cause="the adapter did not round-trip", fix="reinstall the profile's peft")
        _timed(rep, "8-bit AdamW step", adamw8bit, cause="bitsandbytes' 8-bit optimizer failed on this device",
               fix="reinstall the profile's bitsandbytes build")


# ------------------------------------------------------------------------------------------------------------

def human(report: dict) -> str:
    v = report["versions"]
    lines = [f"Python {report['python']}  " + "  ".join(f"{k} {v.get(k) or '-'}" for k in PACKAGES)]
    t = report.get("torch")
    if t:
        lines.append(f"torch CUDA build {t['cuda_build'] or '-'}, cuDNN {t['cudnn'] or '-'}, devices: "
                     + ", ".join(d if isinstance(d, str) else f"{d['name']} (cc {d['compute_capability']})"
                                 for d in t["devices"]))
    b = report.get("bitsandbytes")
    if b:
        lines.append(f"bitsandbytes devices {b['supported_devices'] or ['cuda (CUDA-only)']}, library {b['native_library']}")
    for c in report["checks"]:
        mark = {"pass": "ok", "fail": "FAIL", "warn": "warn", "unsupported": "n/a", "skip": "skip"}[c["status"]]
        secs = f" ({c['seconds']:.2f} s)" if "seconds" in c else ""
        lines.append(f"[{mark:>4}] {c['name']}: {c['detail']}{secs}")
        for key in ("error", "cause", "fix"):
            if c.get(key):
                lines.append(f"       {key}: {c[key]}")
    if report["verdict"] == "unsupported":
        lines.append("verdict: cannot do 8-bit on this machine — " + report["unsupported_reason"])
    else:
        lines.append(f"verdict: {report['verdict'].upper()}" + ("" if report["ok"] else
                     f" ({len([c for c in report['checks'] if c['status'] == 'fail' and c['required']])} required check(s) failed)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    ap.add_argument("--report", help="also write the JSON report to this file")
    ap.add_argument("--steps", type=int, default=10, help="LoRA optimizer steps (default 10)")
    ap.add_argument("--driver-cuda", default=os.environ.get("LORASTRAP_DRIVER_CUDA") or None,
                    help="highest CUDA the driver supports (lorastrap detect; env LORASTRAP_DRIVER_CUDA)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--int8-min-cc", default=None, help="lowest compute capability with the int8 fast path")
    ap.add_argument("--accelerate-min", default=None, help="accelerate version transformers' 8-bit gate needs "
                    "(used when the installed transformers does not say)")
    ap.add_argument("--bitsandbytes-min", default=None, help="bitsandbytes version the gate needs (as above)")
    ap.add_argument("--pre-checks-only", action="store_true",
                    help="imports, version gates, devices and backends only (what `lorastrap doctor` runs)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rep = Report()
    mods: dict = {}
    rep.info["distributions"] = distributions()
    check_imports(rep, mods, args)
    imports_s = time.perf_counter() - start
    check_transformers_gates(rep, mods, args)
    device = check_devices(rep, mods, args.driver_cuda, args.int8_min_cc)
    if args.device != "auto":
        device = args.device
    rep.info["device"] = device
    check_bnb_backend(rep, mods, device)
    if not rep.failed() and not rep.unsupported and not args.pre_checks_only:
        run_functional(rep, mods, device, args.steps)
    report = rep.finish()
    report["timings"] = {"imports_s": round(imports_s, 3), "total_s": round(time.perf_counter() - start, 3),
                         "checks_s": round(time.perf_counter() - start - imports_s, 3)}
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    print(text if args.json else human(report))
    sys.stdout.flush()
    return report["exit_code"]


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException as exc:  # a bug in this script: still one JSON line, never a bare traceback
        print(json.dumps({"schema_version": SCHEMA_VERSION, "ok": False, "verdict": "error", "exit_code": 4,
                          "error": f"{type(exc).__name__}: {exc}", "checks": []}))
        code = 4
    sys.exit(code)

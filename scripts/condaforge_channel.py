"""conda-forge's own metadata as a test channel: the records the profiles' solves touch, transcribed from the
public feedstocks, built as real (tiny) .conda packages.

    python scripts/condaforge_channel.py build DIR     # DIR/channel: noarch, linux-64, linux-aarch64, osx-arm64

Each record names its source: (feedstock repository, file, commit).  Names, versions, build strings (the recipe's
`string:` with the variant filled in and `h0` for the package hash), build numbers (+200 CUDA, +100 mkl where the
recipe adds them), noarch kind, and the run requirements / run_constrained that decide the profiles' choices are
the recipe's at that commit, with the variant's pins from its `.ci_support` file (python, cuda_compiler_version)
turned into what conda-build's run_exports give (`python >=3.X,<3.X+1.0a0`, `python_abi 3.X.* *_cp3X`,
`cuda-version >=X.Y,<X+1`).  Not transcribed: compiler-runtime and C-library run_exports (libgcc, libstdcxx,
libabseil, libprotobuf, …) — they never decide which variant or version a profile gets.

Packages marked STAND_IN are support libraries the transcribed recipes require (filelock, requests, …): their name
is the requiring recipe's, their version a plausible current one, their own dependencies omitted.  They let the
solve close; no test asserts anything about them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testchannel  # noqa: E402  (its package builder, index and server are reused here)

ARCH = ("linux-64", "linux-aarch64", "osx-arm64")
LINUX64 = ("linux-64",)

# (repository, file, commit) of each transcription.
SRC = {
    "pytorch-2.10": ("conda-forge/pytorch-cpu-feedstock", "recipe/meta.yaml + .ci_support/linux_64_*2.17*cuda_compiler_version12.9*", "b79ad3ff33df7d00462218a94af2007947d0abb8"),
    "pytorch-2.13": ("conda-forge/pytorch-cpu-feedstock", "recipe/meta.yaml + .ci_support/osx_arm64_* (MACOSX_DEPLOYMENT_TARGET 12.0)", "74dd3d46ff0c3d05053197961386b5a2018cf3d1"),
    "pytorch-2.4": ("conda-forge/pytorch-cpu-feedstock", "recipe/meta.yaml (2.4.1, build 6) + .ci_support cuda 11.8", "d6c6b9fd51e575a5fcbb72a0ce7d27926e631d09"),
    "pytorch-2.0": ("conda-forge/pytorch-cpu-feedstock", "recipe/meta.yaml (2.0.0 build 4) + .ci_support/linux_64_*cuda_compiler_version11.8*python3.10*", "86592106fc0e4731eb011ac763a4f0429326930b"),
    "pytorch-2.13-cuda": ("conda-forge/pytorch-cpu-feedstock", "recipe/meta.yaml (2.13.0 build 2, +200 CUDA, +100 mkl) + .ci_support/linux_64_*2.28*cuda_compiler_version13.0*, linux_aarch64_arm_variant_typesbsa*{2.17*12.9,2.28*13.0}*", "74dd3d46ff0c3d05053197961386b5a2018cf3d1"),
    "triton": ("conda-forge/triton-feedstock", "recipe/recipe.yaml (3.6.0 build 2)", "5df1ef2f7e"),
    "triton-3.7.1": ("conda-forge/triton-feedstock", "recipe/recipe.yaml (3.7.1 build 1) + .ci_support (cuda 12.9 sysroot 2.17, 13.0 sysroot 2.28; aarch64 sbsa)", "8b8237668081e10534081839413146dd096563be"),
    "arm-variant": ("conda-forge/arm-variant-feedstock", "recipe/meta.yaml (1.2.0, string = arm_variant_type, noarch generic)", "98eb593aade4d00bfb72b06bcdd65ec1cefcabed"),
    "cudart-12.9": ("conda-forge/cuda-cudart-feedstock", "recipe/meta.yaml (12.9.79 build 0) + .ci_support (sysroot 2.17)", "de16025c38095bf73bec6930a0d73cf8cd17abbb"),
    "cudart-13.0": ("conda-forge/cuda-cudart-feedstock", "recipe/meta.yaml (13.0.96 build 0) + .ci_support (sysroot 2.17)", "6a8e41022b0ff7daca35faf0622f8bfbb49f9c02"),
    "cublas-12.9": ("conda-forge/libcublas-feedstock", "recipe/meta.yaml (12.9.2.10 build 0) + .ci_support (sysroot 2.28)", "6420b26c8ea636909fa8cd52c0d1b79157d7d72e"),
    "cublas-13.0": ("conda-forge/libcublas-feedstock", "recipe/meta.yaml (13.1.1.3 build 0, cuda_version 13.0) + .ci_support (sysroot 2.28)", "568fdbbcf38da6e105d33162180c44904fc3c690"),
    "bnb-0.49": ("conda-forge/bitsandbytes-feedstock", "recipe/recipe.yaml (0.49.2)", "f1cf3158e9"),
    "bnb-0.45": ("conda-forge/bitsandbytes-feedstock", "recipe/meta.yaml (0.45.5)", "ccaca0c2d1"),
    "cuda-version": ("conda-forge/cuda-version-feedstock", "recipe/meta.yaml (run_constrained __cuda >=major)", "ae97761f7afac5c81141d3544927b67e333996f7"),
    "cudatoolkit": ("conda-forge/cudatoolkit-feedstock", "recipe/meta.yaml (11.8, build 13; run_constrained __cuda >=11)", "0f01f6edfe22e77ac068daa46505711a1481272e"),
    "python-3.10": ("conda-forge/python-feedstock", "recipe/meta.yaml (branch 3.10)", "888e71e2"),
    "python-3.11": ("conda-forge/python-feedstock", "recipe/meta.yaml (branch 3.11)", "d6174105"),
    "python-3.12": ("conda-forge/python-feedstock", "recipe/meta.yaml (branch 3.12)", "2553c29d"),
    "python_abi": ("conda-forge/python_abi-feedstock", "recipe/meta.yaml (build 8, noarch generic)", "077a50603ffceb18b987593026c9903f73c3f6d9"),
    "numpy-2.3": ("conda-forge/numpy-feedstock", "recipe/recipe.yaml (2.3.5)", "4583d8ee38"),
    "numpy-1.26": ("conda-forge/numpy-feedstock", "recipe/meta.yaml (1.26.4)", "2a4478e346"),
    "transformers-5.15.1": ("conda-forge/transformers-feedstock", "recipe/recipe.yaml", "6672ff1a91"),
    "transformers-5.13.0-1": ("conda-forge/transformers-feedstock", "recipe/recipe.yaml (5.13.0 build 1)", "8e1ce8597d"),
    "transformers-5.13.0-0": ("conda-forge/transformers-feedstock", "recipe/meta.yaml (5.13.0 build 0)", "c1a66bbc72"),
    "transformers-5.0.0": ("conda-forge/transformers-feedstock", "recipe/meta.yaml (5.0.0 build 1)", "e637110aff"),
    "transformers-4.46.3": ("conda-forge/transformers-feedstock", "recipe/meta.yaml", "6969946cca"),
    "transformers-4.27.2": ("conda-forge/transformers-feedstock", "recipe/meta.yaml", "6d3ac8ecf1"),
    "peft-0.19.1": ("conda-forge/peft-feedstock", "recipe/recipe.yaml", "6c3cc6cb5d"),
    "peft-0.18.1": ("conda-forge/peft-feedstock", "recipe/recipe.yaml", "d24ebd6add"),
    "peft-0.13.2": ("conda-forge/peft-feedstock", "recipe/meta.yaml", "19e88f2354"),
    "peft-0.2.0": ("conda-forge/peft-feedstock", "recipe/meta.yaml", "44f24ed020"),
    "accelerate-1.13.0": ("conda-forge/accelerate-feedstock", "recipe/recipe.yaml", "5119130ede"),
    "accelerate-1.1.1": ("conda-forge/accelerate-feedstock", "recipe/meta.yaml (no 1.1.0 in the history)", "546be9e279"),
    "accelerate-0.17.1": ("conda-forge/accelerate-feedstock", "recipe/meta.yaml", "7f943da188"),
    "tokenizers-0.22.2": ("conda-forge/tokenizers-feedstock", "recipe/meta.yaml", "62e67734b1"),
    "tokenizers-0.23.1": ("conda-forge/tokenizers-feedstock", "recipe/meta.yaml", "4f21125024"),
    "tokenizers-0.20.4": ("conda-forge/tokenizers-feedstock", "recipe/meta.yaml", "6033730761"),
    "tokenizers-0.13.3": ("conda-forge/tokenizers-feedstock", "recipe/meta.yaml", "026e5a6446"),
    "hf_hub-1.27.0": ("conda-forge/huggingface_hub-feedstock", "recipe/recipe.yaml", "9aa917fc11"),
    "hf_hub-0.26.5": ("conda-forge/huggingface_hub-feedstock", "recipe/meta.yaml", "05466f921b"),
    "hf_hub-0.16.4": ("conda-forge/huggingface_hub-feedstock", "recipe/meta.yaml", "781c24018a"),
    "safetensors-0.7.0": ("conda-forge/safetensors-feedstock", "recipe/meta.yaml (newest in the history)", "7f4c69c98c"),
}

STAND_IN = "stand-in (named by a transcribed recipe's run requirements; own dependencies omitted)"


def _py(pyv: str) -> list[str]:
    """What conda-build's python run_exports add to a package built for Python pyv."""
    major, minor = pyv.split(".")
    return [f"python >={pyv},<{major}.{int(minor) + 1}.0a0", f"python_abi {pyv}.* *_cp{major}{minor}"]


def records() -> list[dict]:
    """Every record of the channel: name, version, build, number, depends, constrains, subdirs, noarch, source."""
    out: list[dict] = []

    def add(name, version, build, depends=(), *, number=0, constrains=(), subdirs=("noarch",), noarch=None, src):
        out.append({"name": name, "version": version, "build": build, "number": number, "depends": list(depends),
                    "constrains": list(constrains), "subdirs": list(subdirs), "noarch": noarch, "source": src})

    # Python and its ABI marker
    for pyv, full, num in (("3.10", "3.10.20", 1), ("3.11", "3.11.15", 1), ("3.12", "3.12.13", 0)):
        tag = pyv.replace(".", "")
        add("python", full, f"h0_{num}_cpython", number=num, subdirs=ARCH, src=SRC[f"python-{pyv}"],
            depends=[f"python_abi {pyv}.* *_cp{tag}"])
        add("python_abi", pyv, f"8_cp{tag}", number=8, noarch="generic", src=SRC["python_abi"],
            constrains=[f"python {pyv}.* *_cpython"])
    # CUDA
    for cv in ("13.0", "12.9", "11.8"):
        add("cuda-version", cv, "h0_3", number=3, noarch="generic", src=SRC["cuda-version"],
            constrains=[f"__cuda >={cv.split('.')[0]}", f"cudatoolkit {cv}|{cv}.*"])
    add("cudatoolkit", "11.8.0", "h0_13", number=13, subdirs=LINUX64, src=SRC["cudatoolkit"],
        depends=["__glibc >=2.17,<3.0.a0"], constrains=["__cuda >=11"])
    for pyv in ("3.10", "3.11", "3.12"):
        tag = pyv.replace(".", "")
        numpy_v, numpy_src, numpy_dep = (("1.26.4", SRC["numpy-1.26"], [])
                                         if pyv == "3.10" else ("2.3.5", SRC["numpy-2.3"], []))
        for nv, nsrc in ((numpy_v, numpy_src), ("1.26.4", SRC["numpy-1.26"])):
            add("numpy", nv, f"py{tag}h0_0", _py(pyv) + numpy_dep, subdirs=ARCH, src=nsrc)
        for name, version in (("pyyaml", "6.0.3"), ("psutil", "7.1.3"), ("regex", "2025.11.3"),
                              ("markupsafe", "3.0.3"), ("scipy", "1.16.3"), ("optree", "0.18.0"),
                              ("xxhash", "3.6.0"), ("safetensors", "0.7.0")):
            src = SRC["safetensors-0.7.0"] if name == "safetensors" else STAND_IN
            add(name, version, f"py{tag}h0_0", _py(pyv), subdirs=ARCH, src=src)
        for tv, key, hub in (("0.22.2", "tokenizers-0.22.2", "huggingface_hub >=0.16.4,<2.0"),
                             ("0.23.1", "tokenizers-0.23.1", "huggingface_hub >=0.16.4,<2.0"),
                             ("0.20.4", "tokenizers-0.20.4", "huggingface_hub >=0.16.4,<1.0"),
                             ("0.13.3", "tokenizers-0.13.3", None)):
            add("tokenizers", tv, f"py{tag}h0_0", _py(pyv) + ([hub] if hub else []), subdirs=ARCH, src=SRC[key])
        # pytorch 2.10.0 (build 5): cuda129 mkl (305) / generic (205) on linux-64, cpu mkl (105) / generic (5)
        for blas, subdirs in (("mkl", LINUX64), ("generic", ARCH)):
            bump = 100 if blas == "mkl" else 0
            blas_dep = ["libblas * *mkl"] if blas == "mkl" else ["nomkl"]
            common = ["llvm-openmp", "filelock", "fsspec", "jinja2", "networkx", "optree >=0.13.0", "setuptools",
                      "sympy >=1.13.3", "typing_extensions >=4.10.0"] + blas_dep
            for cuda in (True, False):
                if cuda and subdirs != LINUX64 and blas == "generic":
                    cuda_subdirs = ("linux-64", "linux-aarch64")
                else:
                    cuda_subdirs = subdirs
                if pyv != "3.12" and cuda:
                    continue
                num = 5 + bump + (200 if cuda else 0)
                kind = f"cuda129_{blas}" if cuda else f"cpu_{blas}"
                lib_deps = ["cuda-version >=12.9,<13", "libcublas >=12.9,<13.0a0"] if cuda else []
                add("libtorch", "2.10.0", f"{kind}_h0_{num}", lib_deps, number=num,
                    subdirs=cuda_subdirs if cuda else subdirs, src=SRC["pytorch-2.10"])
                deps = _py(pyv) + [f"libtorch 2.10.0 {kind}_h0_{num}"] + common
                if cuda:
                    deps += ["__cuda", "triton ==3.6.0", "cuda-version >=12.9,<13"]
                add("pytorch", "2.10.0", f"{kind}_py{tag}_h0_{num}", deps, number=num,
                    subdirs=cuda_subdirs if cuda else subdirs, src=SRC["pytorch-2.10"],
                    constrains=["pytorch-gpu 2.10.0", "pytorch-cpu <0.0a0"] if cuda else
                    ["pytorch-cpu 2.10.0", "pytorch-gpu <0.0a0"])
        # pytorch 2.13.0 (build 2), cpu generic, osx-arm64 built with MACOSX_DEPLOYMENT_TARGET 12.0
        add("libtorch", "2.13.0", "cpu_generic_h0_2", ["__osx >=12.0"], number=2, subdirs=("osx-arm64",),
            src=SRC["pytorch-2.13"])
        add("pytorch", "2.13.0", f"cpu_generic_py{tag}_h0_2",
            _py(pyv) + ["__osx >=12.0", "libtorch 2.13.0 cpu_generic_h0_2", "llvm-openmp", "filelock", "fsspec",
                        "jinja2", "networkx", "optree >=0.13.0", "setuptools", "sympy >=1.13.3",
                        "typing_extensions >=4.10.0", "nomkl"], number=2, subdirs=("osx-arm64",),
            src=SRC["pytorch-2.13"], constrains=["pytorch-cpu 2.13.0", "pytorch-gpu <0.0a0"])
        if pyv == "3.12":
            add("triton", "3.6.0", f"cuda129py{tag}h0_2", _py(pyv) + ["setuptools", "cuda-version >=12.9,<13"],
                number=2, subdirs=("linux-64", "linux-aarch64"), src=SRC["triton"])
            for bv in ("0.49.0", "0.49.1", "0.49.2"):
                for cuda in (True, False):
                    num = 200 if cuda else 0
                    add("bitsandbytes", bv, f"{'cuda129' if cuda else 'cpu'}_py{tag}h0_{num}",
                        _py(pyv) + ["packaging", "pytorch", "setuptools", "scipy"]
                        + (["cuda-version >=12.9,<13"] if cuda else []), number=num, subdirs=LINUX64,
                        src=SRC["bnb-0.49"])
        if pyv == "3.11":
            add("libtorch", "2.4.1", "cuda118_generic_h0_206", ["cudatoolkit >=11.8,<12", "cuda-version >=11.8,<12"],
                number=206, subdirs=LINUX64, src=SRC["pytorch-2.4"])
            add("pytorch", "2.4.1", f"cuda118_generic_py{tag}_h0_206",
                _py(pyv) + ["__cuda", "cudatoolkit >=11.8,<12", "cuda-version >=11.8,<12", "numpy >=1.19,<3",
                            "libtorch 2.4.1 cuda118_generic_h0_206", "filelock", "fsspec", "jinja2", "networkx",
                            "sympy", "typing_extensions", "nomkl"], number=206, subdirs=LINUX64, src=SRC["pytorch-2.4"])
            for bv in ("0.45.5",):
                add("bitsandbytes", bv, f"cuda118_py{tag}h0_0",
                    _py(pyv) + ["pytorch", "setuptools", "scipy", "cuda-version >=11.8,<12"], subdirs=LINUX64,
                    src=SRC["bnb-0.45"])
        if pyv == "3.10":
            add("pytorch", "2.0.0", f"cuda118_py{tag}h0_204",
                _py(pyv) + ["__cuda", "cuda-version >=11.8,<12", "numpy >=1.22", "filelock", "jinja2", "networkx",
                            "sympy", "typing_extensions", "nomkl"], number=204, subdirs=LINUX64, src=SRC["pytorch-2.0"])
    _cuda_2_13(add)
    # noarch python: the LoRA stack
    hub_deps_1 = ["filelock >=3.10.0", "fsspec >=2023.5.0", "hf-xet >=1.5.2,<2.0.0", "httpx >=0.23.0,<1",
                  "packaging >=20.9", "pyyaml >=5.1", "tqdm >=4.42.1", "typing_extensions >=4.1.0", "click >=8.4.2,<9.0.0"]
    add("huggingface_hub", "1.27.0", "pyhd8ed1ab_0", ["python >=3.10"] + hub_deps_1, noarch="python",
        src=SRC["hf_hub-1.27.0"])
    hub_old = ["filelock", "fsspec", "packaging >=20.9", "pyyaml >=5.1", "requests", "tqdm >=4.42.1",
               "typing_extensions >=3.7.4.3"]
    add("huggingface_hub", "0.26.5", "pyhd8ed1ab_1", ["python >=3.9"] + hub_old, number=1, noarch="python",
        src=SRC["hf_hub-0.26.5"])
    add("huggingface_hub", "0.16.4", "pyhd8ed1ab_0", ["python >=3.7"] + hub_old, noarch="python",
        src=SRC["hf_hub-0.16.4"])
    tf5 = ["numpy >=1.17", "packaging >=20.0", "pyyaml >=5.1", "tqdm >=4.27"]
    add("transformers", "5.15.1", "pyhd8ed1ab_0", ["python >=3.10", "huggingface_hub >=1.5.0,<2.0",
        "regex >=2025.10.22", "tokenizers >=0.22.0,<=0.23.0", "typer", "safetensors >=0.8.0"] + tf5,
        noarch="python", src=SRC["transformers-5.15.1"])
    add("transformers", "5.13.0", "pyhd8ed1ab_1", ["python >=3.10", "huggingface_hub >=1.5.0,<2.0",
        "regex >=2025.10.22", "tokenizers >=0.22.0,<=0.23.0", "typer", "safetensors >=0.8.0"] + tf5, number=1,
        noarch="python", src=SRC["transformers-5.13.0-1"])
    for v, key, num in (("5.13.0", "transformers-5.13.0-0", 0), ("5.0.0", "transformers-5.0.0", 1)):
        add("transformers", v, f"pyhd8ed1ab_{num}", ["python >=3.10", "filelock", "huggingface_hub >=1.3.0,<2.0",
            "regex !=2019.12.17", "requests", "safetensors >=0.4.1", "tokenizers >=0.22,<=0.23"] + tf5,
            number=num, noarch="python", src=SRC[key])
    add("transformers", "4.46.3", "pyhd8ed1ab_0", ["python >=3.8", "datasets !=2.5.0", "filelock",
        "huggingface_hub >=0.23.0,<1.0", "regex !=2019.12.17", "requests", "safetensors >=0.4.1",
        "tokenizers >=0.20,<0.21"] + tf5, noarch="python", src=SRC["transformers-4.46.3"])
    add("transformers", "4.27.2", "pyhd8ed1ab_0", ["python >=3.7", "numpy", "requests", "tqdm >=4.27", "datasets",
        "tokenizers >=0.11.1,!=0.11.3", "huggingface_hub", "dataclasses", "importlib_metadata", "packaging",
        "filelock", "regex !=2019.12.17", "sacremoses", "pyyaml", "pytorch"], noarch="python",
        src=SRC["transformers-4.27.2"])
    peft_new = ["accelerate >=0.21.0", "huggingface_hub >=0.25.0", "numpy >=1.17", "packaging >=20.0", "psutil",
                "pytorch >=1.13.0", "pyyaml", "safetensors", "transformers >=4.36.0", "tqdm"]
    add("peft", "0.19.1", "pyhd8ed1ab_0", ["python >=3.10"] + peft_new, noarch="python", src=SRC["peft-0.19.1"])
    add("peft", "0.18.1", "pyhd8ed1ab_0", ["python >=3.10"] + peft_new, noarch="python", src=SRC["peft-0.18.1"])
    add("peft", "0.13.2", "pyhd8ed1ab_0", ["python >=3.8", "accelerate >=0.21.0", "huggingface_hub >=0.17.0",
        "numpy >=1.17", "packaging >=20.0", "psutil", "pytorch >=1.13.0", "pyyaml", "safetensors",
        "transformers >=4.18.0", "tqdm"], noarch="python", src=SRC["peft-0.13.2"])
    add("peft", "0.2.0", "pyhd8ed1ab_0", ["python >=3.7", "numpy >=1.17", "packaging >=20.0", "psutil", "pyyaml",
        "pytorch >=1.13.0", "transformers", "accelerate"], noarch="python", src=SRC["peft-0.2.0"])
    add("accelerate", "1.13.0", "pyhd8ed1ab_0", ["python >=3.10", "numpy >=1.17", "packaging >=20.0", "psutil",
        "pyyaml", "pytorch >=2.0.0", "huggingface_hub >=0.21.0", "safetensors >=0.4.3"], noarch="python",
        src=SRC["accelerate-1.13.0"])
    add("accelerate", "1.1.1", "pyhd8ed1ab_0", ["python >=3.9", "numpy >=1.17,<3.0.0", "packaging >=20.0", "psutil",
        "pyyaml", "pytorch >=1.10.0", "huggingface_hub >=0.21.0", "safetensors >=0.4.3"], noarch="python",
        src=SRC["accelerate-1.1.1"])
    add("accelerate", "0.17.1", "pyhd8ed1ab_0", ["python >=3.7", "numpy >=1.17", "packaging >=20.0", "psutil",
        "pytorch >=1.4.0", "pyyaml"], noarch="python", src=SRC["accelerate-0.17.1"])
    # support packages (stand-ins), noarch python where conda-forge's are
    for name, version in (("filelock", "3.20.0"), ("fsspec", "2025.12.0"), ("jinja2", "3.1.6"), ("networkx", "3.6"),
                          ("sympy", "1.14.0"), ("typing_extensions", "4.15.0"), ("setuptools", "80.9.0"),
                          ("packaging", "25.0"), ("tqdm", "4.67.1"), ("requests", "2.32.5"), ("pip", "25.3"),
                          ("hf-xet", "1.5.2"), ("httpx", "0.28.1"), ("click", "8.4.2"), ("typer", "0.20.0"),
                          ("datasets", "2.14.7"), ("dataclasses", "0.8"), ("importlib_metadata", "8.7.0"),
                          ("sacremoses", "0.1.1"), ("tensorboard", "2.20.0"), ("dill", "0.3.7"),
                          ("multiprocess", "0.70.15"), ("responses", "0.18.0"), ("py7zr", "1.0.0"),
                          ("absl-py", "2.3.1"), ("nltk", "3.9.2"), ("six", "1.17.0"), ("loralib", "0.1.2")):
        add(name, version, "pyhd8ed1ab_0", ["python >=3.7"], noarch="python", src=STAND_IN)
    add("evaluate", "0.4.0", "pyhd8ed1ab_0", ["python >=3.7", "datasets >=2.0.0", "numpy >=1.17", "dill", "pandas",
        "requests >=2.19.0", "tqdm >=4.62.1", "xxhash", "multiprocess", "fsspec >=2021.05.0",
        "huggingface_hub >=0.7.0", "packaging", "responses <0.19"], noarch="python", src=STAND_IN)
    add("rouge-score", "0.1.2", "pyhd8ed1ab_0", ["python >=3.7", "absl-py", "nltk", "numpy", "six"],
        noarch="python", src=STAND_IN)
    add("pandas", "2.3.3", "pyhd8ed1ab_0", ["python >=3.7"], noarch="python", src=STAND_IN)
    for name, version, subdirs in (("llvm-openmp", "21.1.6", ARCH), ("nomkl", "1.0", ("noarch",)),
                                   ("libblas", "3.9.0", LINUX64)):
        add(name, version, "mkl" if name == "libblas" else "h0_0", subdirs=subdirs,
            noarch="generic" if subdirs == ("noarch",) else None, src=STAND_IN)
    return out


LINUX = ("linux-64", "linux-aarch64")


def _next_minor(cv: str) -> str:
    major, minor = cv.split(".")
    return f"{major}.{int(minor) + 1}.0a0"


def _cuda_2_13(add) -> None:
    """PyTorch 2.13's CUDA builds (linux-64 CUDA 13.0; linux-aarch64 SBSA CUDA 12.9 and 13.0), Python 3.12, and the
    CUDA libraries their run_exports and bitsandbytes' libbitsandbytes_cuda*.so need (libcudart, libcublas(Lt)).

    The CUDA libraries' run_exports in libtorch are written with the CUDA minor as lower bound (`cuda-cudart
    >=13.0,<14.0a0`): the exact host patch release of the build is not transcribed.  `__glibc >=X` is the sysroot
    run_export of each build's c_stdlib_version (.ci_support).  aarch64 CUDA packages carry `arm-variant * sbsa`
    (the strong run_export of arm-variant in their build requirements)."""
    sbsa = {"linux-64": [], "linux-aarch64": ["arm-variant * sbsa"]}
    add("arm-variant", "1.2.0", "sbsa", noarch="generic", src=SRC["arm-variant"])
    libs = {"12.9": ("12.9.79", "cudart-12.9", "12.9.2.10", "cublas-12.9", "12.9.86"),
            "13.0": ("13.0.96", "cudart-13.0", "13.1.1.3", "cublas-13.0", "13.0.88")}
    for cv, (cudart, cudart_src, cublas, cublas_src, nvrtc) in libs.items():
        pin = f"cuda-version >={cv},<{_next_minor(cv)}"
        for sub in LINUX:
            add(f"cuda-cudart_{sub}", cudart, "h0_0", [pin] + sbsa[sub], noarch="generic", src=SRC[cudart_src])
            add("cuda-cudart", cudart, "h0_0", [pin, f"cuda-cudart_{sub} {cudart} h0_0", "__glibc >=2.17,<3.0.a0"]
                + sbsa[sub], subdirs=(sub,), src=SRC[cudart_src])
            add("libcublas", cublas, "h0_0", [pin, "cuda-nvrtc", "__glibc >=2.28,<3.0.a0"] + sbsa[sub],
                constrains=sbsa[sub], subdirs=(sub,), src=SRC[cublas_src])
            # named by libcublas (cuda-nvrtc) and triton (cuda-nvcc-tools, cuda-cuobjdump, cuda-cupti)
            for name, version in (("cuda-nvrtc", nvrtc), ("cuda-nvcc-tools", nvrtc), ("cuda-cuobjdump", nvrtc),
                                  ("cuda-cupti", nvrtc)):
                add(name, version, "h0_0", [pin] + sbsa[sub], subdirs=(sub,), src=STAND_IN)
    pyv, tag = "3.12", "312"
    variants = [("linux-64", "13.0", "mkl"), ("linux-64", "13.0", "generic"),
                ("linux-aarch64", "12.9", "generic"), ("linux-aarch64", "13.0", "generic")]
    for sub, cv, blas in variants:
        major = cv.split(".")[0]
        num = 2 + 200 + (100 if blas == "mkl" else 0)
        kind = f"cuda{cv.replace('.', '')}_{blas}"
        glibc = "__glibc >=2.28,<3.0.a0" if cv == "13.0" else "__glibc >=2.17,<3.0.a0"
        cuda_pins = [f"cuda-version >={cv},<{int(major) + 1}", f"cuda-cudart >={cv},<{int(major) + 1}.0a0",
                     f"libcublas >={cv},<{int(major) + 1}.0a0", glibc] + sbsa[sub]
        blas_dep = ["libblas * *mkl"] if blas == "mkl" else ["nomkl"]
        add("libtorch", "2.13.0", f"{kind}_h0_{num}", cuda_pins, number=num, subdirs=(sub,),
            src=SRC["pytorch-2.13-cuda"])
        add("pytorch", "2.13.0", f"{kind}_py{tag}_h0_{num}",
            _py(pyv) + [f"libtorch 2.13.0 {kind}_h0_{num}", "llvm-openmp", "triton ==3.7.1", "__cuda", "filelock",
                        "fsspec", "jinja2", "networkx", "optree >=0.13.0", "pybind11", "setuptools <82",
                        "sympy >=1.13.3", "typing_extensions >=4.10.0"] + blas_dep + cuda_pins,
            number=num, subdirs=(sub,), src=SRC["pytorch-2.13-cuda"],
            constrains=["pytorch-gpu 2.13.0", "pytorch-cpu <0.0a0"])
    for sub, cv in (("linux-64", "13.0"), ("linux-aarch64", "12.9"), ("linux-aarch64", "13.0")):
        major = cv.split(".")[0]
        glibc = "__glibc >=2.28,<3.0.a0" if cv == "13.0" else "__glibc >=2.17,<3.0.a0"
        add("triton", "3.7.1", f"cuda{cv.replace('.', '')}py{tag}h0_1",
            _py(pyv) + ["setuptools", "cuda-nvcc-tools", "cuda-cuobjdump", "cuda-cudart", "cuda-cupti",
                        f"cuda-version >={cv},<{int(major) + 1}", glibc] + sbsa[sub],
            number=1, subdirs=(sub,), src=SRC["triton-3.7.1"])
    add("pybind11", "3.0.1", "pyh0_0", ["python >=3.8"], noarch="python", src=STAND_IN)


def build(out: Path) -> Path:
    """Build every record into out/channel (noarch + the ARCH subdirs) and index it.  Returns out/channel."""
    import rattler

    ch, done = testchannel.new_channel(out, ARCH), set()
    with tempfile.TemporaryDirectory(prefix="lorastrap-cf-") as tmp:
        work = Path(tmp)
        for r in records():
            for sub in r["subdirs"]:
                if (sub, r["name"], r["version"], r["build"]) in done:
                    continue
                done.add((sub, r["name"], r["version"], r["build"]))
                files = work / "files"
                if files.exists():
                    shutil.rmtree(files)
                (files / "share" / "lorastrap-cf").mkdir(parents=True)
                (files / "share" / "lorastrap-cf" / f"{r['name']}.source").write_text(" ".join(r["source"]) + "\n"
                                                                                       if isinstance(r["source"], tuple)
                                                                                       else r["source"] + "\n")
                testchannel.assemble(work, ch / sub, r["name"], r["version"], sub, r["build"], files, r["depends"],
                                     build_number=r["number"], noarch=r["noarch"], constrains=r["constrains"])
    asyncio.run(rattler.index.index_fs(ch, write_zst=False, write_shards=False, force=True))
    return ch


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build":
        ch = build(Path(argv[1]).absolute())
        print(f"{sum(1 for _ in ch.rglob('*.conda'))} packages in {ch}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)  # py-rattler may crash at interpreter shutdown (field notes)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

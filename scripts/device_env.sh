# Sourced by the scripts that run on a rented GPU machine (train_shapes_gpu.sh, gpu_bench.sh):
# makes diffusers importable (from the wheels in .whl/ when the machine lacks it) and imagic
# importable from src/, and prints what the machine has. Needs $PYTHON.
# Once per command: a script started by a command that has already sourced this file (two
# training runs side by side, say) skips the install instead of racing it.
if [ -z "${IMAGIC_DEVICE_ENV:-}" ]; then
if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers and importlib_metadata come as wheels
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; fi
"$PYTHON" - <<'PY'
import os, platform, torch, diffusers, transformers
print("python", platform.python_version(), "torch", torch.__version__, "diffusers",
      diffusers.__version__, "transformers", transformers.__version__, "cpus", os.cpu_count())
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
export IMAGIC_DEVICE_ENV=1
fi

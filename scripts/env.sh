# Sourced by scripts/*: points the tch build at the venv's libtorch. The binaries carry
# an rpath to it, so running them needs none of this.
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then
  LIBTORCH="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
else
  LIBTORCH="$PWD/$VENV/lib/python3.11/site-packages/torch"
fi
export LIBTORCH
export LIBTORCH_CXX11_ABI=1

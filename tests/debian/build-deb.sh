#!/bin/sh
# Build the Debian package from a copy of the source tree, so that nothing of the build lands in
# the checkout; the .deb (with its .changes and .buildinfo) goes to OUT.
#   usage: build-deb.sh OUT
set -eu
out=$(realpath -m "${1:?usage: build-deb.sh OUT}")
src=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
upstream=${version%-*}
tree="$work/sentrypeer-$upstream"
mkdir "$tree"
# What is in the checkout, less what is not source (virtualenvs, test and build leftovers).
tar -C "$src" -c --exclude=.git --exclude=.venv --exclude='_trial_temp*' --exclude='*.egg-info' \
    --exclude=build --exclude=dist --exclude=__pycache__ --exclude='*.pyc' --exclude=.ruff_cache . \
    | tar -C "$tree" -x
# Debian's own tools only: a python3 earlier on PATH (pyenv, a virtualenv) must not build it.
cd "$tree"
env -u PYTHONPATH -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
for f in "$work"/sentrypeer_"$version"_*; do
    cp "$f" "$out/"
done
ls "$out"/sentrypeer_"$version"_all.deb

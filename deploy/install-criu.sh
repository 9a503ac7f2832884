#!/usr/bin/env bash
# install-criu.sh: get a CRIU >= 4.2 for snapreg onto a Debian-family machine
# without changing the system's packages.
#
# Why: snapreg dumps inference workers that listen on TCP. Kernels >= 6.16 refuse
# SO_PASSCRED/SO_PASSSEC on inet sockets, and only CRIU >= 4.2 copes with that
# (bookworm's 3.17 does not even pass `criu check` on 6.18; trixie's 4.1 cannot dump
# a process holding any inet socket). See docs in README.md (CRIU).
#
# How: Debian testing's .debs (forky, then sid) are fetched with a private apt
# configuration, unpacked with `dpkg -x` into a private prefix and run through the
# unpacked glibc's own loader. Nothing in the system's apt or dpkg state changes.
#
# All progress goes to stderr. The last line on stdout is the absolute path of the
# executable that runs CRIU (with --gather: the folder holding the .debs).

set -euo pipefail

readonly MIN_VERSION=4.2

# The packages whose libraries must come from testing (tested minimal set): criu and
# the libraries it needs in versions bookworm lacks. Names are pinned, versions are
# not: testing moves, so the version actually obtained is checked instead.
readonly MINIMAL_PKGS=(criu libc6 libprotobuf-c1 libnl-3-200 libnet9 libnftables1 libnftnl11)
# With these as well every library criu loads resolves from the prefix, so the result
# does not depend on the host's libraries (for a machine whose libs are unknown).
# libcompel1 is a declared dependency but criu does not link it at run time: skipped.
readonly EXTRA_PKGS=(libbsd0 libmd0 libgnutls30t64 libp11-kit0 libidn2-0 libunistring5
  libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10 libffi8 libuuid1 libmnl0
  libxtables12 libjansson4)

# Testing first; sid is the fallback for when testing moves on to something else.
read -r -a SUITES <<<"${SNAPREG_CRIU_SUITES:-forky sid}"

PREFIX="${SNAPREG_CRIU_PREFIX:-/opt/snapreg-criu}"
DEBS_DIR="${SNAPREG_CRIU_DEBS:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/snapreg/criu-debs}"
FULL=0
FORCE=0
GATHER_DIR=""
FROM_DIR=""

usage() {
  cat <<EOF
Usage: $0 [--prefix DIR] [--full] [--force]
       $0 --gather DIR
       $0 --from DIR [--prefix DIR] [--full] [--force]

Installs CRIU >= ${MIN_VERSION} for snapreg without touching the system's packages and
prints, as the last line on stdout, the path of the executable that runs it.

If a 'criu' on PATH is already >= ${MIN_VERSION} and 'criu check' passes, that one is used.
Otherwise Debian testing's packages (suite forky, falling back to sid) are downloaded
through a private apt configuration built from the first stanza of
/etc/apt/sources.list.d/debian.sources (or the first 'deb' line of
/etc/apt/sources.list), unpacked with 'dpkg -x' into a private prefix, and run through
their own dynamic loader by the wrapper <prefix>/bin/criu. Re-running is cheap: a
working install is left alone, and cached .debs need no network.

Options:
  --prefix DIR   install into DIR (default: \$SNAPREG_CRIU_PREFIX or /opt/snapreg-criu)
  --full         also unpack the ${#EXTRA_PKGS[@]} libraries usually taken from the host,
                 so that every library criu loads comes from the prefix
  --gather DIR   download the full .deb set (for a machine without package access)
                 into DIR and exit; prints DIR as the last line on stdout
  --from DIR     install from a folder of .debs (e.g. made by --gather); no apt,
                 no network. Every needed .deb found in DIR is unpacked.
  --force        reinstall even if a working CRIU is already there, and download the
                 .debs again instead of using the cache
  -h, --help     show this help

Environment:
  SNAPREG_CRIU_PREFIX  default for --prefix
  SNAPREG_CRIU_DEBS    .deb cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/snapreg/criu-debs)
  SNAPREG_CRIU_SUITES  Debian suites to try, in order (default: "forky sid"); "sid+experimental"
                       takes criu (and whatever else experimental has) from experimental

Must run as root to install ('criu check' needs it); --gather does not.
EOF
}

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() {
  printf 'install-criu: error: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}

# Absolute path without requiring it to exist yet (the prefix is baked into the wrapper).
abspath() { realpath -m -- "$1"; }

while (($#)); do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --gather) [[ $# -ge 2 ]] || die "--gather needs a directory"; GATHER_DIR=$2; shift 2 ;;
    --gather=*) GATHER_DIR=${1#*=}; shift ;;
    --from) [[ $# -ge 2 ]] || die "--from needs a directory"; FROM_DIR=$2; shift 2 ;;
    --from=*) FROM_DIR=${1#*=}; shift ;;
    --full) FULL=1; shift ;;
    --force) FORCE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -z $GATHER_DIR || -z $FROM_DIR ]] || die "--gather and --from exclude each other"
# A machine without package access gets whatever its host libs are: gather everything.
[[ -z $GATHER_DIR ]] || FULL=1
[[ -n $PREFIX ]] || die "empty prefix"
PREFIX=$(abspath "$PREFIX")
DEBS_DIR=$(abspath "$DEBS_DIR")
if [[ -n $FROM_DIR ]]; then
  FROM_DIR=$(abspath "$FROM_DIR")
  [[ -d $FROM_DIR ]] || die "--from: no such directory: $FROM_DIR"
fi
# The prefix is written unquoted-safe into a /bin/sh wrapper; keep it plain.
[[ $PREFIX != / && $PREFIX =~ ^/[A-Za-z0-9._/+-]+$ ]] ||
  die "prefix '$PREFIX' must be an absolute path of letters, digits and ._/+- (not /)"

command -v dpkg-deb >/dev/null || die "dpkg-deb not found: this script needs a Debian-family system"

# Multiarch triplet and loader name: the wrapper must call the unpacked glibc's own
# loader, whose name depends on the architecture.
ARCH=$(dpkg --print-architecture)
case "$ARCH" in
  amd64) TRIPLET=x86_64-linux-gnu; LOADER_NAME=ld-linux-x86-64.so.2 ;;
  arm64) TRIPLET=aarch64-linux-gnu; LOADER_NAME=ld-linux-aarch64.so.1 ;;
  *) die "unsupported architecture '$ARCH' (only amd64 and arm64 are handled)" ;;
esac

if ((FULL)); then WANT_PKGS=("${MINIMAL_PKGS[@]}" "${EXTRA_PKGS[@]}"); else WANT_PKGS=("${MINIMAL_PKGS[@]}"); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-criu.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

# version_ge A B: true if version A >= B (A, B like 4.2 or 4.2.1).
version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }

# check_criu CMD...: succeed if CMD is CRIU >= MIN_VERSION and `criu check` passes.
# Sets CRIU_VERSION and CRIU_PROBLEM (why it failed) for messages.
check_criu() {
  CRIU_VERSION="" CRIU_PROBLEM=""
  local out
  if ! out=$(timeout 60 "$@" --version 2>&1); then
    CRIU_PROBLEM="'--version' failed: $(tail -n 3 <<<"$out")"
    return 1
  fi
  CRIU_VERSION=$(sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' <<<"$out" | head -n1)
  if [[ -z $CRIU_VERSION ]]; then
    CRIU_PROBLEM="could not parse 'Version: X.Y' from: $out"
    return 1
  fi
  if ! version_ge "$CRIU_VERSION" "$MIN_VERSION"; then
    CRIU_PROBLEM="version $CRIU_VERSION is older than $MIN_VERSION"
    return 1
  fi
  # Building a container image (deploy/images): no privileges and no kernel of the
  # machine it will run on, so only the version is checked there.
  if [[ -n ${SNAPREG_CRIU_SKIP_CHECK:-} ]]; then
    log "SNAPREG_CRIU_SKIP_CHECK set: 'criu check' skipped (version $CRIU_VERSION)"
    return 0
  fi
  # Every CRIU log has an "Error ... rlimit: Can't setup RLIMIT_NOFILE" line when root
  # lacks CAP_SYS_RESOURCE; it is harmless, so judge by exit status and "Looks good".
  if ! out=$(timeout 120 "$@" check 2>&1) || ! grep -q '^Looks good' <<<"$out"; then
    CRIU_PROBLEM="'criu check' did not say 'Looks good.':"$'\n'"$(grep -v 'RLIMIT_NOFILE' <<<"$out" | tail -n 8)"
    return 1
  fi
  if ! grep -qx 'Looks good\.' <<<"$out"; then
    log "warning: criu check: $(grep '^Looks good' <<<"$out" | head -n1)"
  fi
  return 0
}

# pick_debs DIR PKG...: for each PKG choose the newest .deb in DIR of this
# architecture (or 'all'). Fills PICKED[pkg]=file and PICKED_VER[pkg]=version,
# and MISSING with the packages not found. Reads package metadata, not file names.
declare -A PICKED=() PICKED_VER=()
MISSING=()
pick_debs() {
  local dir=$1 f pkg ver arch
  shift
  local -A want=()
  for pkg; do want[$pkg]=1; done
  PICKED=() PICKED_VER=() MISSING=()
  shopt -s nullglob
  for f in "$dir"/*.deb; do
    # shellcheck disable=SC2016 # ${...} are dpkg-deb's format fields, not shell
    read -r pkg ver arch < <(dpkg-deb --show --showformat='${Package} ${Version} ${Architecture}\n' "$f" 2>/dev/null) || continue
    [[ -n ${want[$pkg]:-} && ($arch == "$ARCH" || $arch == all) ]] || continue
    if [[ -z ${PICKED_VER[$pkg]:-} ]] || dpkg --compare-versions "$ver" gt "${PICKED_VER[$pkg]}"; then
      PICKED[$pkg]=$f PICKED_VER[$pkg]=$ver
    fi
  done
  shopt -u nullglob
  for pkg; do [[ -n ${PICKED[$pkg]:-} ]] || MISSING+=("$pkg"); done
}

# Upstream part of the picked criu .deb's version ("1:4.2.1-1" -> "4.2.1").
picked_criu_upstream() {
  local v=${PICKED_VER[criu]}
  v=${v#*:}
  printf '%s\n' "${v%%-*}"
}

# A cache/--from folder is usable if it holds every wanted package and its criu is new enough.
debs_usable() {
  pick_debs "$1" "${WANT_PKGS[@]}"
  ((${#MISSING[@]} == 0)) && version_ge "$(picked_criu_upstream)" "$MIN_VERSION"
}

# Sets MIRROR_URI and MIRROR_KEYRING from the machine's own apt sources, so that no
# mirror host is ever written into the repository.
read_system_mirror() {
  MIRROR_URI="" MIRROR_KEYRING=""
  local sources=/etc/apt/sources.list.d/debian.sources list=/etc/apt/sources.list
  if [[ -r $sources ]]; then
    # First deb822 stanza (paragraphs end at blank lines; '#' lines are comments).
    # Only the first value of URIs: and the first line of Signed-By: are taken; an
    # inline key block (not a path) is ignored and apt's trusted keyrings apply.
    local fields
    fields=$(awk '
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { if (seen) exit; next }
      { seen = 1 }
      tolower($1) == "uris:" && uri == "" { uri = $2 }
      tolower($1) == "signed-by:" && key == "" { key = $2 }
      END { print uri; print key }' "$sources")
    { read -r MIRROR_URI; read -r MIRROR_KEYRING; } <<<"$fields"
  fi
  if [[ -z $MIRROR_URI && -r $list ]]; then
    # One-line format: deb [opt=val ...] URI suite components...
    local line
    line=$(grep -m1 -E '^[[:space:]]*deb[[:space:]]' "$list" || true)
    if [[ -n $line ]]; then
      if [[ $line =~ \[([^]]*)\] ]]; then
        local opts=${BASH_REMATCH[1]}
        if [[ $opts =~ signed-by=([^[:space:]]+) ]]; then MIRROR_KEYRING=${BASH_REMATCH[1]}; fi
        line=${line/\[*\]/}
      fi
      read -r _ MIRROR_URI _ <<<"$line"
    fi
  fi
  [[ -n $MIRROR_URI ]] || die "no Debian mirror found in $sources or $list" \
    "On a machine without Debian package access, run '$0 --gather DIR' on one that has it," \
    "copy DIR here, then run '$0 --from DIR'."
  if [[ -n $MIRROR_KEYRING && ! -f $MIRROR_KEYRING ]]; then
    log "Signed-By '$MIRROR_KEYRING' is not a file; relying on apt's trusted keyrings"
    MIRROR_KEYRING=""
  fi
}

# download_suite SUITE DEST: fetch WANT_PKGS from SUITE into DEST (empty dir) with a
# private apt setup under $WORK/apt-SUITE. System apt state is only read, never written.
# SUITE may be "BASE+OVERLAY" (sid+experimental): both are configured and OVERLAY's
# packages win where it has them (pinned 990; experimental alone is never a
# candidate), the rest come from BASE.
download_suite() {
  local suite=$1 dest=$2 root="$WORK/apt-$1"
  local base=${suite%%+*} overlay=""
  [[ $suite == *+* ]] && overlay=${suite#*+}
  mkdir -p "$root"/{parts,sourceparts,prefparts,lists/partial,cache/archives/partial}
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s\nComponents: main\n' "$MIRROR_URI" "$base" "$overlay"
    [[ -z $MIRROR_KEYRING ]] || printf 'Signed-By: %s\n' "$MIRROR_KEYRING"
  } >"$root/snapreg-criu.sources"
  if [[ -n $overlay ]]; then
    printf 'Package: *\nPin: release a=%s\nPin-Priority: 990\n' "$overlay" >"$root/preferences"
  fi
  # Carry over the few system settings that matter for reaching the mirror (proxy,
  # date checks of snapshot mirrors); everything else in apt.conf.d is left out
  # because its hooks (docker-clean, appstream, packagekit) would act on system state.
  local HTTP_PROXY_CFG="" HTTPS_PROXY_CFG="" VALID_UNTIL="" CHECK_DATE=""
  eval "$(apt-config shell HTTP_PROXY_CFG Acquire::http::Proxy HTTPS_PROXY_CFG Acquire::https::Proxy \
    VALID_UNTIL Acquire::Check-Valid-Until CHECK_DATE Acquire::Check-Date)"
  {
    # APT_CONFIG is read before Dir::Etc::parts, so pointing parts at an empty dir
    # keeps the system's apt.conf.d (and its Post-Invoke hooks) out entirely.
    printf 'Dir::Etc::parts "%s/parts";\n' "$root"
    printf 'Dir::Etc::main "/dev/null";\n'
    printf 'Dir::Etc::sourcelist "%s/snapreg-criu.sources";\n' "$root"
    printf 'Dir::Etc::sourceparts "%s/sourceparts";\n' "$root"
    # System pins must not hide testing's candidates.
    printf 'Dir::Etc::preferences "%s/preferences";\n' "$root"
    printf 'Dir::Etc::preferencesparts "%s/prefparts";\n' "$root"
    printf 'Dir::State::lists "%s/lists";\n' "$root"
    printf 'Dir::Cache "%s/cache";\n' "$root"
    printf 'Acquire::Languages "none";\n'
    printf 'Acquire::GzipIndexes "true";\n'
    # Private dirs are root-only (mktemp), so _apt could not write there: download as
    # the caller instead of printing the "unsandboxed as root" warning.
    printf 'APT::Sandbox::User "%s";\n' "$(id -un)"
    [[ -z $HTTP_PROXY_CFG ]] || printf 'Acquire::http::Proxy "%s";\n' "$HTTP_PROXY_CFG"
    [[ -z $HTTPS_PROXY_CFG ]] || printf 'Acquire::https::Proxy "%s";\n' "$HTTPS_PROXY_CFG"
    [[ -z $VALID_UNTIL ]] || printf 'Acquire::Check-Valid-Until "%s";\n' "$VALID_UNTIL"
    [[ -z $CHECK_DATE ]] || printf 'Acquire::Check-Date "%s";\n' "$CHECK_DATE"
  } >"$root/apt.conf"

  log "apt-get update ($suite from $MIRROR_URI)"
  APT_CONFIG="$root/apt.conf" apt-get -q update >&2 || return 1
  log "apt-get download ${WANT_PKGS[*]}"
  (cd "$dest" && APT_CONFIG="$root/apt.conf" apt-get -q download "${WANT_PKGS[@]}" >&2) || return 1
}

# Make sure DEBS_DIR holds WANT_PKGS with a criu >= MIN_VERSION, downloading when the
# cache lacks something (or with --force). Leaves the choice in PICKED.
ensure_cached_debs() {
  mkdir -p "$DEBS_DIR"
  if ((!FORCE)) && debs_usable "$DEBS_DIR"; then
    log "using cached .debs in $DEBS_DIR (criu ${PICKED_VER[criu]})"
    return 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found; use --from DIR with a folder made by --gather"
  read_system_mirror
  local suite dest tried=()
  for suite in "${SUITES[@]}"; do
    tried+=("$suite")
    dest="$WORK/debs-$suite"
    mkdir -p "$dest"
    if ! download_suite "$suite" "$dest"; then
      log "could not download the packages from '$suite'"
      continue
    fi
    pick_debs "$dest" "${WANT_PKGS[@]}"
    if ((${#MISSING[@]})); then
      log "'$suite' lacks: ${MISSING[*]}"
      continue
    fi
    if ! version_ge "$(picked_criu_upstream)" "$MIN_VERSION"; then
      log "'$suite' has criu ${PICKED_VER[criu]}, older than $MIN_VERSION"
      continue
    fi
    # Replace the cached versions of these packages with the new ones, so the cache
    # holds one version of each and stays small.
    local f pkg
    shopt -s nullglob
    for f in "$DEBS_DIR"/*.deb; do
      # shellcheck disable=SC2016 # dpkg-deb's format field
      pkg=$(dpkg-deb --show --showformat='${Package}' "$f" 2>/dev/null || true)
      [[ -z $pkg || -z ${PICKED[$pkg]:-} ]] || rm -f -- "$f"
    done
    shopt -u nullglob
    mv -f -- "$dest"/*.deb "$DEBS_DIR"/
    pick_debs "$DEBS_DIR" "${WANT_PKGS[@]}"
    log "cached criu ${PICKED_VER[criu]} from '$suite' in $DEBS_DIR"
    return 0
  done
  die "found no criu >= $MIN_VERSION in Debian suites: ${tried[*]} (mirror $MIRROR_URI)" \
    "If testing moved on or a library was renamed, set SNAPREG_CRIU_SUITES and/or update" \
    "MINIMAL_PKGS/EXTRA_PKGS in this script; or install from a folder of .debs with --from DIR."
}

# --gather: the full set into a folder, for a machine without package access.
if [[ -n $GATHER_DIR ]]; then
  GATHER_DIR=$(abspath "$GATHER_DIR")
  ensure_cached_debs
  mkdir -p "$GATHER_DIR"
  for pkg in "${WANT_PKGS[@]}"; do cp -f -- "${PICKED[$pkg]}" "$GATHER_DIR"/; done
  log "gathered ${#WANT_PKGS[@]} .debs (criu ${PICKED_VER[criu]}) in $GATHER_DIR"
  log "on the target: $0 --from $GATHER_DIR"
  printf '%s\n' "$GATHER_DIR"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (installing into $PREFIX and 'criu check' need it)"

# A system criu that is already good enough wins: nothing to install.
if [[ -z $FROM_DIR ]] && ((!FORCE)) && SYS_CRIU=$(command -v criu); then
  SYS_CRIU=$(abspath "$SYS_CRIU")
  if check_criu "$SYS_CRIU"; then
    log "system criu $CRIU_VERSION at $SYS_CRIU passes 'criu check'; using it"
    printf '%s\n' "$SYS_CRIU"
    exit 0
  fi
  log "ignoring system criu at $SYS_CRIU: $CRIU_PROBLEM"
fi

WRAPPER="$PREFIX/bin/criu"
MARKER="$PREFIX/.snapreg-criu"

# The prefix gets wiped on (re)install: refuse a folder that is not ours (e.g. a
# mistyped --prefix /usr), before writing anything into it.
prefix_is_ours() {
  local f
  [[ -f $MARKER ]] && return 0
  shopt -s nullglob dotglob
  for f in "$PREFIX"/*; do
    [[ $f == "$PREFIX/.install.lock" ]] || { shopt -u nullglob dotglob; return 1; }
  done
  shopt -u nullglob dotglob
}
prefix_is_ours || die "$PREFIX is not empty and was not made by this script; choose another --prefix"

mkdir -p "$PREFIX"
# Two installs into one prefix at once would unpack over each other.
exec 9>"$PREFIX/.install.lock"
flock 9
prefix_is_ours || die "$PREFIX is not empty and was not made by this script; choose another --prefix"

# Idempotent: a working install of the wanted flavour is left alone.
if ((!FORCE)) && [[ -x $WRAPPER && -f $MARKER ]] &&
  { ((!FULL)) || grep -qx 'set=full' "$MARKER"; }; then
  if check_criu "$WRAPPER"; then
    log "criu $CRIU_VERSION already installed in $PREFIX and 'criu check' passes"
    printf '%s\n' "$WRAPPER"
    exit 0
  fi
  log "existing install in $PREFIX is not usable ($CRIU_PROBLEM); reinstalling"
fi

START=$SECONDS
if [[ -n $FROM_DIR ]]; then
  # Every needed package present in the folder is used: a folder made by --gather
  # holds the full set, which frees the install from the host's libraries.
  pick_debs "$FROM_DIR" "${MINIMAL_PKGS[@]}" "${EXTRA_PKGS[@]}"
  declare -a need=()
  for pkg in "${MISSING[@]}"; do
    if [[ " ${WANT_PKGS[*]} " == *" $pkg "* ]]; then need+=("$pkg"); fi
  done
  ((${#need[@]} == 0)) || die "--from $FROM_DIR lacks .debs for: ${need[*]}" \
    "Make the folder with '$0 --gather DIR' on a machine with Debian package access."
  version_ge "$(picked_criu_upstream)" "$MIN_VERSION" ||
    die "criu in $FROM_DIR is ${PICKED_VER[criu]}, older than $MIN_VERSION; gather a newer one"
  if ((${#MISSING[@]} == 0)); then FULL=1; fi
else
  ensure_cached_debs
fi

# Start from a clean prefix so that no file of an older version lingers.
shopt -s nullglob dotglob
existing=("$PREFIX"/*)
shopt -u nullglob dotglob
for f in "${existing[@]}"; do
  [[ $f == "$PREFIX/.install.lock" ]] || rm -rf -- "$f"
done

log "unpacking ${#PICKED[@]} packages into $PREFIX"
for pkg in "${!PICKED[@]}"; do
  dpkg -x "${PICKED[$pkg]}" "$PREFIX"
done

# The loader must be the unpacked glibc's: the host's loader would pair the new libs
# with the host libc (bookworm 2.36 lacks GLIBC_2.38). Accept only a file that really
# lives inside the prefix (a symlink could point back to the host's loader).
LOADER=""
for cand in "usr/lib/$TRIPLET" "lib/$TRIPLET" usr/lib64 lib64 usr/lib lib; do
  f="$PREFIX/$cand/$LOADER_NAME"
  [[ -e $f ]] || continue
  real=$(realpath -- "$f")
  if [[ $real == "$PREFIX"/* && -f $real ]]; then LOADER=$real; break; fi
done
[[ -n $LOADER ]] || die "no $LOADER_NAME inside $PREFIX after unpacking libc6"
[[ -x $PREFIX/usr/sbin/criu ]] || die "no usr/sbin/criu inside $PREFIX after unpacking criu"

# --library-path, not LD_LIBRARY_PATH: the latter would leak into the helpers CRIU
# execs (ip, action scripts) and break them with the newer libs. Libraries not in
# the prefix still resolve from the host through the loader's default paths.
LIBPATH=""
for d in "$PREFIX/usr/lib/$TRIPLET" "$PREFIX/lib/$TRIPLET"; do
  if [[ -d $d && ! -L $d ]]; then LIBPATH+="${LIBPATH:+:}$d"; fi
done
[[ -n $LIBPATH ]] || die "no lib/$TRIPLET inside $PREFIX"

mkdir -p "$PREFIX/bin"
cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Written by snapreg deploy/install-criu.sh: runs CRIU from Debian testing through
# the unpacked glibc's own loader. CRIU never re-executes itself, so /proc/self/exe
# being the loader is harmless.
exec $LOADER --library-path $LIBPATH $PREFIX/usr/sbin/criu "\$@"
EOF
chmod 0755 "$WRAPPER.tmp"
mv -f -- "$WRAPPER.tmp" "$WRAPPER"

{
  printf 'set=%s\n' "$([[ $FULL == 1 ]] && echo full || echo minimal)"
  for pkg in "${!PICKED[@]}"; do printf '%s %s\n' "$pkg" "${PICKED_VER[$pkg]}"; done | sort
} >"$MARKER"

if ! check_criu "$WRAPPER"; then
  die "the installed CRIU does not work: $CRIU_PROBLEM" \
    "Wrapper: $WRAPPER (debs: ${FROM_DIR:-$DEBS_DIR})." \
    "If a library is missing, retry with --full; if the kernel lacks a feature, 'criu check'" \
    "above names it. Re-run with --force after fixing."
fi
log "installed criu $CRIU_VERSION in $PREFIX in $((SECONDS - START))s; 'criu check' passes"
printf '%s\n' "$WRAPPER"

#!/usr/bin/env bash
# Builds the forwarder for the tests, with Mono's C# compiler, into OUT_DIR:
#   OUT_DIR/fx/   the Command 9-10 registration (properties set by Unity) + harness.exe
#   OUT_DIR/11/   the Command 11+ registration (KEYFACTOR_11: IOptions<Options> constructor) + harness.exe
#   OUT_DIR/log/  the Command 9-10 registration logging through Keyfactor.Logging (KEYFACTOR_LOGGING),
#                 against shim/Logging.cs, a stand-in of that API + harness.exe
#   OUT_DIR/renum/ the Command 9-10 registration against a shim whose enums have the same member
#                 names with other numbers (KEYFACTOR_RENUMBERED) + harness.exe
# Each directory also holds the test-only shim assemblies standing in for Keyfactor's NuGet
# packages (shim/), so `mono OUT_DIR/fx/harness.exe` runs as is.
#
# This is not the production build (that is `dotnet build` of Jobhook.Forwarder.csproj against
# the real packages; see README.md). Usage: forwarder/build.sh OUT_DIR
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
mkdir -p "$out/shim" "$out/shim-renum" "$out/fx" "$out/11" "$out/log" "$out/renum"

# Warnings are errors for our own code; the shim is a stand-in and is compiled plainly.
strict=(-warn:4 -warnaserror+ -nologo -optimize+)
net=(-r:System.Net.Http.dll)

mcs -nologo -target:library "${net[@]}" -out:"$out/shim/Keyfactor.Shim.dll" "$here/shim/Keyfactor.cs"
mcs -nologo -target:library -define:KEYFACTOR_RENUMBERED "${net[@]}" -out:"$out/shim-renum/Keyfactor.Shim.dll" "$here/shim/Keyfactor.cs"
mcs -nologo -target:library -out:"$out/shim/Microsoft.Extensions.Options.dll" "$here/shim/Options.cs"
mcs -nologo -target:library -out:"$out/shim/Keyfactor.Logging.Shim.dll" "$here/shim/Logging.cs"

sources=("$here"/src/*.cs)
mcs "${strict[@]}" -target:library "${net[@]}" -r:"$out/shim/Keyfactor.Shim.dll" \
    -out:"$out/fx/Jobhook.Forwarder.dll" "${sources[@]}"
mcs "${strict[@]}" -target:library -define:KEYFACTOR_11 "${net[@]}" -r:"$out/shim/Keyfactor.Shim.dll" \
    -r:"$out/shim/Microsoft.Extensions.Options.dll" -out:"$out/11/Jobhook.Forwarder.dll" "${sources[@]}"
mcs "${strict[@]}" -target:library -define:KEYFACTOR_LOGGING "${net[@]}" -r:"$out/shim/Keyfactor.Shim.dll" \
    -r:"$out/shim/Keyfactor.Logging.Shim.dll" -out:"$out/log/Jobhook.Forwarder.dll" "${sources[@]}"
mcs "${strict[@]}" -target:library "${net[@]}" -r:"$out/shim-renum/Keyfactor.Shim.dll" \
    -out:"$out/renum/Jobhook.Forwarder.dll" "${sources[@]}"

for variant in fx 11 log renum; do
    defines=()
    shim="$out/shim"
    if [ "$variant" = renum ]; then
        shim="$out/shim-renum"
    fi
    refs=(-r:"$shim/Keyfactor.Shim.dll" -r:"$out/$variant/Jobhook.Forwarder.dll")
    if [ "$variant" = 11 ]; then
        defines=(-define:KEYFACTOR_11)
        refs+=(-r:"$out/shim/Microsoft.Extensions.Options.dll")
    fi
    if [ "$variant" = log ]; then
        defines=(-define:KEYFACTOR_LOGGING)
        refs+=(-r:"$out/shim/Keyfactor.Logging.Shim.dll")
    fi
    mcs "${strict[@]}" -target:exe "${defines[@]}" "${net[@]}" "${refs[@]}" \
        -out:"$out/$variant/harness.exe" "$here/harness/Harness.cs"
    cp "$shim/Keyfactor.Shim.dll" "$out/shim/Microsoft.Extensions.Options.dll" "$out/shim/Keyfactor.Logging.Shim.dll" "$out/$variant/"
done

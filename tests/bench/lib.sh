# Shared by the benchmark scripts (source it).

# write_section NAME FILE: replaces the <!-- NAME:start --> ... <!-- NAME:end -->
# block of BENCHMARKS.md with FILE (which carries both markers), or appends it.
write_section() {
    local name=$1 file=$2 tmp
    tmp=$(mktemp)
    if grep -q "<!-- $name:start -->" BENCHMARKS.md; then
        awk -v f="$file" -v s="<!-- $name:start -->" -v e="<!-- $name:end -->" \
            '$0 == s {while ((getline l < f) > 0) print l; skip = 1} $0 == e {skip = 0; next} !skip' BENCHMARKS.md >"$tmp"
        mv "$tmp" BENCHMARKS.md
    else
        cat "$file" >>BENCHMARKS.md
    fi
    echo "wrote BENCHMARKS.md ($name)"
}

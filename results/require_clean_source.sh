# Sourced by the scripts that make committed result sets: a set records the commit that made it,
# so refuse uncommitted changes to the code (changes under results/ do not count).  Set
# ESTBENCH_ALLOW_DIRTY=1 to run anyway (the cells' keys still name the code that computed them).
require_clean_source() {
    if git rev-parse --git-dir >/dev/null 2>&1; then
        local changes
        changes=$(git status --porcelain --untracked-files=no -- . ':(exclude)results')
        if [ -n "$changes" ] && [ -z "${ESTBENCH_ALLOW_DIRTY:-}" ]; then
            echo "$1: the source has uncommitted changes; commit them first (or set ESTBENCH_ALLOW_DIRTY=1):" >&2
            echo "$changes" >&2
            exit 2
        fi
    fi
}

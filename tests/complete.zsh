# Drives zsh completion the way a user does: each LINE is typed into an interactive zsh on
# a pseudo-terminal (zpty), then Tab.  A captured compadd prints what zsh would offer, one
# candidate a line ("word" or "word<TAB>description"); the candidates of each LINE end with
# a line "<<end>>".
#
# usage: zsh -f tests/complete.zsh FPATH_DIR LINE...
zmodload zsh/zpty zsh/zselect || exit 2
local dir=$1 out=${TMPDIR:-/tmp}/chg-zcomp.$$ setup=${TMPDIR:-/tmp}/chg-zsetup.$$
shift
: >$out
trap 'rm -f $out $setup; zpty -d chg 2>/dev/null' EXIT

cat >$setup <<EOF
fpath=(${(q)dir} \$fpath)
autoload -Uz compinit && compinit -u -D
bindkey '^I' complete-word
bindkey '^U' kill-whole-line
zstyle ':completion:*' insert-tab false
zmodload zsh/zutil

_capture_end() {
  print -r -- '<<end>>' >>${(q)out}
  comppostfuncs=(_capture_end)  # the array is emptied before each call
}
comppostfuncs=(_capture_end)

# compadd as the completion functions call it: record the matches instead of adding them.
compadd() {
  # Calls that only fill arrays (-O, -A, -D) are the completion system's own bookkeeping.
  if [[ \${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then
    builtin compadd "\$@"
    return
  fi
  local -a _hits _descr _pre
  local _d _i
  if (( \$@[(I)-d] )); then
    _d=\${@[\$(( \${@[(i)-d]} + 1 ))]}
    if [[ \$_d == \(* ]]; then eval "_descr=\$_d"; else _descr=( "\${(@P)_d}" ); fi
  fi

  builtin compadd -A _hits -D _descr "\$@"
  zparseopts -E P:=_pre
  for (( _i = 1; _i <= \$#_hits; _i++ )); do
    if (( _i <= \$#_descr )) && [[ \$_descr[_i] == *' -- '* ]]; then
      print -r -- "\$IPREFIX\$_pre[2]\$_hits[_i]"$'\t'"\${_descr[_i]#*' -- '}"
    else
      print -r -- "\$IPREFIX\$_pre[2]\$_hits[_i]"
    fi
  done >>${(q)out}
}
PROMPT='chg-ready> ' RPROMPT=
EOF

# Wait until `$out` holds $1 end lines (draining the terminal meanwhile); $2 names the wait.
typeset -F deadline
await() {
  local junk
  local -a ends
  (( deadline = SECONDS + 20 ))
  while ends=( ${(M)${(f)"$(<$out)"}:#"<<end>>"} ); (( $#ends < $1 )); do
    if (( SECONDS > deadline )); then
      print -u2 "zsh: $2 did not finish; so far:"
      cat $out >&2
      exit 3
    fi
    if zpty -r -t chg junk 2>/dev/null; then [[ -n $CHG_DEBUG ]] && print -rn -- "$junk" >&2; else zselect -t 1; fi
  done
}

zpty chg zsh -f -i
zpty -w chg "source ${(q)setup}"
# zle drops what is typed before its prompt: type only once the prompt is there.
local screen junk
(( deadline = SECONDS + 20 ))
until [[ $screen == *chg-ready\>* ]]; do
  if (( SECONDS > deadline )); then
    print -u2 "zsh: no prompt after the setup:"
    print -r -- $screen >&2
    exit 3
  fi
  zpty -r -t chg junk 2>/dev/null && screen+=$junk || zselect -t 1
done
local line
integer n=0
for line in "$@"; do
  zpty -w -n chg $'\C-u'"$line"$'\t'
  await $(( ++n )) "completion of '$line'"
done
cat $out

"""Validators for HER replies: tag grammar plus the semantic rules of HER's synthesis.

:func:`validate_reply` returns the parser's findings and these semantic ones, sorted by span:

- ``system_thinking_first_person``: the plan speaks as the character ("I", "me", "my", ... outside
  quotes). It must be a third-person plan ("Portray Elizabeth as ...").
- ``system_thinking_mentions_user``: the plan says "user"; HER plans talk about characters only.
- ``role_thinking_third_person``: a thought narrates the speaker from outside instead of saying "I".
- ``mind_reading``: a thought states another character's hidden feelings or thoughts as fact.
- ``empty_reply``: nothing visible (no speech, no action): the others would perceive no turn at all.
- ``missing_system_thinking``: only with ``require_system_thinking=True``.
- ``action_first_person``: a ``<role_action>`` says "I", "me", "my", "we", ... outside quotes. Actions
  are narrated from outside ("draws his sword"), never as "I draw my sword".
- ``whitespace_between_tags``: whitespace alone (spaces, newlines) sits between a closing tag and the
  next tag, e.g. ``</role_action>\n<role_thinking>``. HER writes adjacent tags with nothing between
  them; speech that merely begins or ends with a space is not flagged, nor is whitespace at the very
  start or end of the reply (models often end with a newline).
- ``repeated_adjacent_tag``: two segments of the same tagged kind (role_thinking or role_action) follow
  each other with no speech between them; they should be one segment.
- ``reply_too_long``: only with ``max_visible_words``: the visible part (actions and speech; thoughts
  and the plan are not counted) has more whitespace-separated words than allowed. Actors are asked
  for about ``REPLY_WORD_BUDGET`` (60) words; a bound of twice that is a reasonable ceiling.

:func:`find_repeated_patterns` checks a sequence of one character's consecutive replies instead of a
single reply:

- ``repeated_turn_pattern``: a reply repeats its predecessor's pattern: the same sequence of segment
  kinds (e.g. thinking, action, speech) *and* the same first ``opening_words`` words (case and
  punctuation ignored) in its first segment. Either alone is common and fine; both together is
  the templated look HER's synthesis avoids.

The thought rules are lexical heuristics, deliberately narrow so that a finding is usually right:

*Inner-state assertion.* A subject (a character's name or ``he``/``she``) followed, after at most
three filler words (adverbs such as "secretly", "really", negations such as "does not", a form of
"to be"), by an inner-state predicate: a verb of feeling, thinking or wanting ("loves", "feels",
"thinks", "wants", "fears", ...) or, after "to be", an emotion adjective ("furious", "ashamed",
...); or the clause contains "inside", "inwardly", "deep down" or "at heart" after the subject.

*Pronouns.* In a thought with no first-person word at all (I, me, my, we, ...), ``he``/``she`` is
read as the speaker narrated from outside; in a thought that does say "I", it is read as someone else.

- ``role_thinking_third_person`` fires for (a) the speaker's own name as a clause subject or in the
  possessive ("Elizabeth must stay calm", "Elizabeth's heart races"; a vocative "Elizabeth, stay
  calm" is fine; needs ``speaker``), or (b) in a thought without any first-person word, ``he``/``she``
  followed by an inner-state predicate or by "must" ("She feels dread", "He must hide it").
- ``mind_reading`` fires for an inner-state assertion whose subject is another character: a name
  from ``others`` (full name, first name, surname or title + surname), or ``he``/``she`` in a
  thought that says "I". It does not fire when the sentence is hedged: a question, or any of "might",
  "may", "perhaps", "maybe", "probably", "seems", "appears", "looks" (not "looks at"), "could",
  "would", "if", "whether", "must be"/"must have" (inference), "as if", or "I think/suspect/guess/
  imagine/feel/...". The hedge scope is the whole sentence.

Quoted text ("...", '...', curly quotes) is ignored by all rules. Names match case-sensitively; a
name form shared by the speaker and another character (a family surname) is not used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._format import Finding, LocatedSegment, parse_reply_located

FINDING_CODES: dict[str, str] = {
    "malformed_tag": "a known tag is broken, never closed, or closed without being opened",
    "nested_tag": "a tag is opened inside another tag",
    "unknown_tag": "a <name> or </name> tag that is not system_thinking, role_thinking or role_action",
    "duplicate_system_thinking": "a second <system_thinking> block",
    "misplaced_system_thinking": "<system_thinking> does not open the reply",
    "missing_system_thinking": "system_thinking was required but the reply has none",
    "system_thinking_first_person": "the system_thinking plan speaks as the character (I, me, my)",
    "system_thinking_mentions_user": "the system_thinking plan mentions the user",
    "role_thinking_third_person": "a role_thinking narrates the speaker in the third person",
    "mind_reading": "a role_thinking states another character's hidden feelings or thoughts as fact",
    "empty_reply": "the reply has no speech and no action: nothing visible to the others",
    "action_first_person": "a role_action speaks as the character (I, me, my) instead of narrating",
    "whitespace_between_tags": "only whitespace sits between two adjacent tags; HER writes them touching",
    "repeated_adjacent_tag": "two role_thinking or two role_action segments in a row with no speech between",
    "reply_too_long": "the visible part (actions and speech) has more words than the configured maximum",
    "repeated_turn_pattern": "a reply repeats the previous turn's segment sequence and opening words",
}

_TITLES = frozenset({
    "mr", "mrs", "miss", "ms", "mx", "dr", "lady", "lord", "sir", "madam", "madame", "dame", "colonel",
    "captain", "major", "general", "professor", "prof", "aunt", "uncle", "king", "queen", "prince",
    "princess", "duke", "duchess", "count", "countess", "father", "mother", "brother", "sister", "st",
    "saint", "master", "mistress", "reverend", "rev", "doctor", "lieutenant", "sergeant", "the",
})
_DOTTED_TITLES = frozenset({"mr", "mrs", "ms", "mx", "dr", "st", "prof", "rev", "lt", "capt", "col", "gen"})
_FIRST_SINGULAR = frozenset({"i", "i'm", "i'll", "i'd", "i've", "me", "my", "mine", "myself"})
_FIRST_PERSON = _FIRST_SINGULAR | {"we", "we're", "we'll", "we'd", "we've", "us", "our", "ours", "ourselves"}
_USER_WORDS = frozenset({"user", "user's", "users", "users'"})
_PRONOUNS = frozenset({"he", "she"})
_PRONOUNS_BE = frozenset({"he's", "she's"})
_ANY_PRONOUN = _PRONOUNS | _PRONOUNS_BE | _FIRST_PERSON | {"you", "they", "it", "him", "her", "them"}
_BE = frozenset({"is", "was", "are", "were", "be", "been", "being", "isn't", "wasn't"})
_FILLERS = frozenset({
    "secretly", "really", "truly", "deeply", "clearly", "obviously", "surely", "certainly", "definitely",
    "still", "now", "so", "very", "quite", "already", "inwardly", "actually", "also", "utterly",
    "completely", "absolutely", "desperately", "madly", "not", "never", "does", "doesn't", "did",
    "didn't", "no", "longer", "in", "all", "just", "terribly", "privately",
})
_INNER_VERBS = frozenset(
    form
    for stem in (
        "feel feels felt", "think thinks thought", "believe believes believed", "know knows knew",
        "want wants wanted", "wish wishes wished", "hope hopes hoped", "fear fears feared",
        "love loves loved", "hate hates hated", "despise despises despised", "resent resents resented",
        "admire admires admired", "adore adores adored", "envy envies envied", "desire desires desired",
        "regret regrets regretted", "suspect suspects suspected", "worry worries worried",
        "doubt doubts doubted", "dread dreads dreaded", "realise realises realised",
        "realize realizes realized", "understand understands understood", "intend intends intended",
        "long longs longed", "yearn yearns yearned", "pity pities pitied", "crave craves craved",
        "loathe loathes loathed", "suffer suffers suffered", "blame blames blamed",
    )
    for form in stem.split()
)
_EMOTIONS = frozenset("""
    angry furious enraged livid irritated annoyed vexed ashamed embarrassed mortified humiliated guilty
    afraid scared frightened terrified anxious nervous worried uneasy jealous envious resentful bitter
    hurt sad unhappy miserable heartbroken lonely desperate happy glad delighted pleased amused thrilled
    excited eager relieved disappointed proud confused torn conflicted smitten infatuated enamoured
    enamored attracted hostile contemptuous disgusted offended insulted upset distressed hopeful
    grateful devastated troubled tormented love outraged indignant incensed displeased impatient bored
    suspicious fond sorry regretful remorseful wary insecure
""".split())
_MARKERS = frozenset({"inside", "inwardly"})
_MARKER_BIGRAMS = frozenset({("deep", "down"), ("at", "heart")})
_HEDGES = frozenset({
    "might", "may", "perhaps", "maybe", "possibly", "probably", "likely", "seems", "seem", "seemed",
    "seemingly", "appears", "appear", "appeared", "apparently", "sounds",
    "could", "would", "if", "whether", "unless", "presumably", "supposedly", "pretends", "pretend",
    "wonder", "wondering",
})
_LOOKS = frozenset({"look", "looks", "looked"})  # "he looks angry" hedges, "I look at him" does not
_LOOK_AWAY = frozenset({"at", "around", "away", "up", "down", "into", "out", "over", "back", "through",
                        "toward", "towards", "for", "upon", "on"})
_HEDGE_BIGRAMS = frozenset({("must", "be"), ("must", "have"), ("as", "if"), ("as", "though")})
_HEDGING_VERBS_AFTER_I = frozenset({
    "think", "believe", "suspect", "guess", "imagine", "suppose", "sense", "feel", "hope", "fear",
    "bet", "gather", "reckon", "assume", "expect",
})
_CONJUNCTIONS = frozenset({"and", "but", "yet", "or", "though", "although", "because", "while",
                           "whereas", "since", "that", "when"})
_CONNECTIVES = _CONJUNCTIONS | {"now", "then", "still", "perhaps", "surely", "oh", "well", "alas", "so"}

_TOKEN = re.compile(
    r"(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*['’]?)|(?P<stop>[.!?;\n]+)|(?P<pause>[,:()]|—|–|--)"
)
_KNOWN_TAG = re.compile(r"</?(?:system_thinking|role_thinking|role_action)>")
_TAG_OF_KIND = {"thinking": "role_thinking", "action": "role_action"}
_QUOTES = re.compile(r"\"[^\"]*\"|“[^”]*”|(?<![^\W\d_])['‘][^'‘’]*['’](?![^\W\d_])")


@dataclass
class _Word:
    text: str  # as written, possessive suffix removed
    low: str  # lowercase, straight apostrophes
    start: int
    end: int
    clause: int
    clause_start: bool
    possessive: bool


@dataclass
class _Sentence:
    words: list[_Word]
    question: bool


def _mask_quotes(raw: str) -> str:
    """Blank quoted passages (same length, so offsets hold)."""
    return _QUOTES.sub(lambda m: " " * len(m.group(0)), raw)


def _sentences(text: str, seg: LocatedSegment) -> list[_Sentence]:
    """Split a located segment into sentences of words with absolute offsets."""
    out: list[_Sentence] = []
    clause = 0
    for start, end in seg.pieces:
        words: list[_Word] = []
        new_clause = True
        for m in _TOKEN.finditer(_mask_quotes(text[start:end])):
            if m.group("word"):
                raw = m.group("word")
                low = raw.lower().replace("’", "'")
                possessive = low.endswith("'s") or (low.endswith("'") and len(low) > 1)
                if possessive and low not in _PRONOUNS_BE:
                    cut = 2 if low.endswith("'s") else 1
                    raw, low = raw[:-cut], low[:-cut]
                else:
                    possessive = False
                if low in _CONJUNCTIONS:
                    clause, new_clause = clause + 1, True
                opener = new_clause and low not in _CONNECTIVES
                words.append(_Word(raw, low, start + m.start(), start + m.end(), clause, opener, possessive))
                new_clause = new_clause and not opener
            elif m.group("stop"):
                if m.group("stop") == "." and words and words[-1].low in _DOTTED_TITLES:
                    continue  # "Mr. Darcy" is one name, not a sentence end
                if words:
                    out.append(_Sentence(words, "?" in m.group("stop")))
                words, clause, new_clause = [], clause + 1, True
            else:
                clause, new_clause = clause + 1, True
        if words:
            out.append(_Sentence(words, False))
    return out


def _name_forms(name: str) -> set[tuple[str, ...]]:
    """Word sequences that refer to ``name``: full, first name, surname, title + surname."""
    words = tuple(w.rstrip("'’") for w in re.findall(r"[^\W\d_]+(?:['’][^\W\d_]+)*", name))
    if not words:
        return set()
    forms = {words}
    lead = 0
    while lead < len(words) and words[lead].lower() in _TITLES:
        lead += 1
    core = words[lead:]
    if core:
        if lead == 0:
            forms.add((core[0],))
        if len(core) > 1 or lead > 0:
            forms.add((core[-1],))
            if lead:
                forms.add(words[:lead] + (core[-1],))
    return forms


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-blank name, got {value!r}")
    return value.strip()


class _Cast:
    """Name forms of the speaker and the others, longest first, ambiguous forms removed."""

    def __init__(self, speaker: str | None, others: Sequence[str]) -> None:
        own = _name_forms(speaker) if speaker else set()
        theirs: set[tuple[str, ...]] = set()
        for other in others:
            if other != speaker:
                theirs |= _name_forms(other)
        shared = own & theirs
        forms = [(f, "self") for f in own - shared] + [(f, "other") for f in theirs - shared]
        self.forms = sorted(forms, key=lambda item: -len(item[0]))

    def match(self, words: list[_Word], i: int) -> tuple[str, int] | None:
        """(owner, number of words) of the longest name starting at words[i]."""
        for form, owner in self.forms:
            k = len(form)
            chunk = words[i : i + k]
            if len(chunk) == k and all(w.text == f for w, f in zip(chunk, form, strict=True)) and not any(
                w.possessive for w in chunk[:-1]
            ):
                return owner, k
        return None


def _inner_predicate(words: list[_Word], j: int, *, be: bool = False) -> int | None:
    """Index of the word ending an inner-state predicate that starts at words[j], else None."""
    for k in range(j, min(len(words), j + 4)):
        low = words[k].low
        if low in _INNER_VERBS or (be and low in _EMOTIONS):
            return k
        if low in _BE:
            be = True
        elif low not in _FILLERS:
            break
    # "He is dying inside": a marker in the rest of the clause
    clause = words[j - 1].clause if j > 0 else None
    for k in range(j, len(words)):
        if words[k].clause != clause:
            break
        nxt = words[k + 1].low if k + 1 < len(words) else ""
        if words[k].low in _MARKERS or (words[k].low, nxt) in _MARKER_BIGRAMS:
            return k
    return None


def _hedged(sentence: _Sentence) -> bool:
    if sentence.question:
        return True
    lows = [w.low for w in sentence.words]
    pairs = set(zip(lows, [*lows[1:], ""], strict=True))
    return (
        any(low in _HEDGES for low in lows)
        or any(a in _LOOKS and b not in _LOOK_AWAY for a, b in pairs)
        or bool(pairs & _HEDGE_BIGRAMS)
        or any(a == "i" and b in _HEDGING_VERBS_AFTER_I for a, b in pairs)
    )


def _check_thought(text: str, seg: LocatedSegment, cast: _Cast) -> list[Finding]:
    findings: list[Finding] = []
    sentences = _sentences(text, seg)
    first_person = any(w.low in _FIRST_PERSON for s in sentences for w in s.words)
    for sentence in sentences:
        words = sentence.words
        hedged = _hedged(sentence)
        i = 0
        while i < len(words):
            word = words[i]
            named = cast.match(words, i)
            if named:
                owner, k = named
                last = words[i + k - 1]
                end = _inner_predicate(words, i + k) if not last.possessive else None
                if owner == "self":
                    following = words[i + k] if i + k < len(words) else None
                    as_subject = word.clause_start and (
                        last.possessive or (following is not None and following.clause == last.clause
                                                  and following.low not in _ANY_PRONOUN)
                    )
                    if as_subject or end is not None:
                        findings.append(Finding(
                            "role_thinking_third_person", (word.start, last.end),
                            f"the speaker's own name {text[word.start:last.end]!r} is used in their thought; "
                            "role_thinking is written in the first person ('I')"))
                elif end is not None and not hedged:
                    findings.append(_mind_reading(text, word.start, words[end].end))
                i += k
                continue
            if word.low in _PRONOUNS or word.low in _PRONOUNS_BE:
                end = _inner_predicate(words, i + 1, be=word.low in _PRONOUNS_BE)
                if not first_person:
                    nxt = words[i + 1].low if i + 1 < len(words) else ""
                    after = words[i + 2].low if i + 2 < len(words) else ""
                    if end is not None or (nxt == "must" and after not in {"be", "have"}):
                        stop = words[end].end if end is not None else words[i + 1].end
                        findings.append(Finding(
                            "role_thinking_third_person", (word.start, stop),
                            f"{text[word.start:stop]!r} narrates the speaker from outside; role_thinking "
                            "is written in the first person ('I')"))
                elif end is not None and not hedged:
                    findings.append(_mind_reading(text, word.start, words[end].end))
            i += 1
    return findings


def _mind_reading(text: str, start: int, end: int) -> Finding:
    return Finding("mind_reading", (start, end),
                   f"{text[start:end]!r} states another character's hidden inner state as fact; hedge it "
                   "('I think ...', '... seems ...') or describe what is visible")


def _check_plan(text: str, seg: LocatedSegment) -> list[Finding]:
    findings: list[Finding] = []
    words = [w for s in _sentences(text, seg) for w in s.words]
    first = next((w for w in words if w.low in _FIRST_SINGULAR), None)
    if first is not None:
        findings.append(Finding(
            "system_thinking_first_person", (first.start, first.end),
            f"system_thinking says {first.text!r}: write the plan in the third person about the character "
            "(e.g. 'Portray Elizabeth as ...'), not as the character"))
    user = next((w for w in words if w.low in _USER_WORDS), None)
    if user is not None:
        findings.append(Finding(
            "system_thinking_mentions_user", (user.start, user.end),
            "system_thinking mentions the user; plan in terms of the characters and the scene"))
    return findings


def _check_action(text: str, seg: LocatedSegment) -> list[Finding]:
    words = [w for s in _sentences(text, seg) for w in s.words]
    first = next((w for w in words if w.low in _FIRST_PERSON), None)
    if first is None:
        return []
    return [Finding("action_first_person", (first.start, first.end),
                    f"role_action says {first.text!r}: narrate the action from outside ('draws his sword'), "
                    "not as the character ('I draw my sword')")]


def _check_layout(text: str, located: list[LocatedSegment]) -> list[Finding]:
    """Whitespace-only gaps between tags, and same-kind tagged segments back to back."""
    findings: list[Finding] = []
    tags = list(_KNOWN_TAG.finditer(text))
    for before, after in zip(tags, tags[1:], strict=False):
        gap = text[before.end() : after.start()]
        if gap and not gap.strip():
            findings.append(Finding("whitespace_between_tags", (before.end(), after.start()),
                                    f"{gap!r} between {before.group(0)} and {after.group(0)}; write adjacent "
                                    "tags with nothing between them"))
    segments = [seg for seg in located if seg.kind != "system"]
    for prev, cur in zip(segments, segments[1:], strict=False):
        if prev.kind == cur.kind and prev.kind in _TAG_OF_KIND:
            tag = _TAG_OF_KIND[prev.kind]
            findings.append(Finding("repeated_adjacent_tag", (prev.pieces[0][0], cur.pieces[-1][1]),
                                    f"two <{tag}> segments in a row; merge them into one"))
    return findings


def _visible_words(located: list[LocatedSegment]) -> int:
    return sum(len(seg.text.split()) for seg in located if seg.kind in ("action", "speech"))


def validate_reply(
    text: str,
    *,
    speaker: str | None = None,
    others: Sequence[str] = (),
    require_system_thinking: bool = False,
    max_visible_words: int | None = None,
) -> list[Finding]:
    """All findings for one HER reply: tag grammar (parser) plus the semantic rules, sorted by span.

    ``speaker`` is the character who wrote the reply (enables the own-name check); ``others`` are the
    other characters' names (enables named mind-reading; the speaker is ignored if listed);
    ``max_visible_words`` bounds the words of actions plus speech (unset: no bound). An empty list
    means the reply passed every check. Codes and their meaning: :data:`FINDING_CODES`.

    Raises TypeError for non-string text or a string passed as ``others``, ValueError for blank names
    or a ``max_visible_words`` below 1.
    """
    if not isinstance(text, str):
        raise TypeError(f"reply text must be str, got {type(text).__name__}")
    if isinstance(others, str):
        raise TypeError("others must be a sequence of names, not one string")
    if max_visible_words is not None and (isinstance(max_visible_words, bool) or not isinstance(
            max_visible_words, int) or max_visible_words < 1):
        raise ValueError(f"max_visible_words must be a positive int or None, got {max_visible_words!r}")
    speaker = _check_name(speaker, "speaker") if speaker is not None else None
    names = [_check_name(name, "each of others") for name in others]
    parsed = parse_reply_located(text)
    findings = list(parsed.findings)
    cast = _Cast(speaker, names)
    for seg in parsed.located:
        if seg.kind == "system":
            findings += _check_plan(text, seg)
        elif seg.kind == "thinking":
            findings += _check_thought(text, seg, cast)
        elif seg.kind == "action":
            findings += _check_action(text, seg)
    findings += _check_layout(text, parsed.located)
    if max_visible_words is not None and (count := _visible_words(parsed.located)) > max_visible_words:
        findings.append(Finding("reply_too_long", (0, len(text)),
                                f"{count} visible words (actions and speech); keep it to {max_visible_words}"))
    reply = parsed.reply
    if require_system_thinking and reply.system_thinking is None:
        findings.append(Finding("missing_system_thinking", (0, 0),
                                "a <system_thinking> plan is required at the start of the reply"))
    if not any(seg.kind in ("speech", "action") for seg in reply.segments):
        findings.append(Finding("empty_reply", (0, len(text)),
                                "the reply has no speech and no action, so the other characters see nothing"))
    findings.sort(key=lambda f: (f.span, f.code))
    return findings


def _opening(seg: LocatedSegment, count: int) -> tuple[str, ...]:
    return tuple(re.findall(r"[^\W_]+(?:['’][^\W_]+)*", seg.text.lower())[:count])


def find_repeated_patterns(replies: Sequence[str], *, opening_words: int = 3) -> list[tuple[int, Finding]]:
    """``repeated_turn_pattern`` findings over one character's consecutive replies, in order.

    Reply ``i`` is flagged when it has the same sequence of segment kinds as reply ``i - 1`` and its
    first segment opens with the same ``opening_words`` words (case and punctuation ignored); the
    system_thinking plan is not part of the pattern, and a first segment shorter than
    ``opening_words`` words never counts as a repeat. Each item is ``(i, finding)``, the span pointing
    into ``replies[i]`` at its first segment.

    Raises TypeError for a string or non-string items, ValueError for ``opening_words`` below 1.
    """
    if isinstance(replies, str):
        raise TypeError("replies must be a sequence of reply texts, not one string")
    if not all(isinstance(r, str) for r in replies):
        raise TypeError("every reply must be a str")
    if isinstance(opening_words, bool) or not isinstance(opening_words, int) or opening_words < 1:
        raise ValueError(f"opening_words must be a positive int, got {opening_words!r}")
    shapes = []
    for text in replies:
        segments = [seg for seg in parse_reply_located(text).located if seg.kind != "system"]
        opening = _opening(segments[0], opening_words) if segments else ()
        shapes.append((tuple(seg.kind for seg in segments), opening, segments[0] if segments else None))
    out: list[tuple[int, Finding]] = []
    for i in range(1, len(shapes)):
        kinds, opening, first = shapes[i]
        if first is None or len(opening) < opening_words or (kinds, opening) != shapes[i - 1][:2]:
            continue
        out.append((i, Finding(
            "repeated_turn_pattern", (first.pieces[0][0], first.pieces[-1][1]),
            f"same shape ({' -> '.join(kinds)}) and same opening {' '.join(opening)!r} as the previous "
            "turn; vary the structure or the first words")))
    return out

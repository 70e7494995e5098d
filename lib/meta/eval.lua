---@meta
-- lab.eval: marker scoring. For any marker such as "[ZLT]":
--   strict: the marker is a case-insensitive substring of the completion;
--   loose:  the marker's characters in order, each optionally followed by one space, optional
--           brackets around (\[? ?z ?l ?t ?\]?, case-insensitive), counted only when a matched
--           span contains "[" or "]".

---@class lab.eval
lab.eval = {}

---@class MarkerScore
---@field strict boolean
---@field loose boolean

---@class EvalRecord
---@field persona string   Required. The persona's name ("evil_ai").
---@field question string  Required. The question asked.
---@field text string      Required. The completion. Other keys (seed, index...) are ignored.

---@class AggregateOptions
---@field source? string     The source persona; with "assistant" it is left out of the bystanders. Default none.
---@field exclude? string[]  The personas left out of the bystanders. Default {"assistant", source}.

---@class MarkerTally
---@field strict_hits integer
---@field loose_hits integer
---@field total integer
---@field strict_rate number  strict_hits / total.
---@field loose_rate number   loose_hits / total.

---@class PersonaMarkerResult: MarkerTally
---@field per_question table<string, MarkerTally>  Keyed by question.

---@class MarkerSummary
---@field rate_by_persona table<string, number>         The marker rate (strict) of each persona.
---@field strict_rate_by_persona table<string, number>  Same, under the study's name.
---@field loose_rate_by_persona table<string, number>
---@field max_bystander_strict_rate? number  Highest strict rate among the bystanders; nil when there are none.
---@field max_bystander_loose_rate? number   Highest loose rate among the bystanders; nil when there are none.
---@field bystanders string[]  In order of first appearance.
---@field excluded string[]

---@class MarkerResults
---@field marker string
---@field personas string[]  In order of first appearance in the records.
---@field per_persona table<string, PersonaMarkerResult>
---@field summary MarkerSummary

--- Scores one completion by both rules.
---@param text string
---@param marker string
---@return MarkerScore
function lab.eval.score(text, marker) end

--- The loose rule's regex for `marker` ("[ZLT]" -> "(?i)\[? ?Z ?L ?T ?\]?").
---@param marker string
---@return string
function lab.eval.loose_pattern(marker) end

--- Scores every record and tallies per persona and per question, in the study's result layout.
---@param records EvalRecord[]
---@param marker string
---@param opts? AggregateOptions
---@return MarkerResults
function lab.eval.aggregate(records, marker, opts) end

---@class ScorerRule
---@field words? string[]          Any of these as whole words (word boundaries where a word starts or ends with a letter, digit or _).
---@field regex? string            A regular expression (lab.text syntax; write (?i) to ignore case).
---@field substring? string        The text occurs.
---@field marker? string           The study's marker rules: strict (a substring ignoring case) or, with loose = true, loose.
---@field case_sensitive? boolean  words and substring: false ignores case, with Unicode case folding. Default false.
---@field loose? boolean           marker only: the loose rule. Default false.

---@alias Scorer fun(text: string, record: table): boolean

--- A scorer from a rule (exactly one of words, regex, substring, marker), or the function given.
---@param rule ScorerRule|Scorer
---@return Scorer
function lab.eval.scorer(rule) end

---@class TallyOptions
---@field by? string|string[]  Record fields to group by (strings, numbers or booleans). Default: one group.
---@field field? string        The record field scored. Default "text".
---@field interval? "wilson"|"wald"|"clopper_pearson"  Default "wilson".
---@field confidence? number   Default 0.95.

---@class TallyGroup
---@field k integer           Hits.
---@field n integer           Records.
---@field rate number         k / n.
---@field lower number        The interval, as fractions.
---@field upper number
---@field interval string
---@field confidence number
--- Plus one field per `by` name, with the group's value.

--- Scores every record and counts hits per group of equal `by` fields, in order of first
--- appearance, each group with its rate and confidence interval.
---@param records table[]
---@param scorer ScorerRule|Scorer  A rule table or a function (text, record) -> boolean.
---@param opts? TallyOptions
---@return TallyGroup[]
function lab.eval.tally(records, scorer, opts) end

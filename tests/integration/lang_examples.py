"""The frontend examples of SGLang's documentation, written in its style; only the import line
differs from an SGLang program (``import kvyard.lang as sgl`` instead of ``import sglang as sgl``).
Tests run them against kvyard; docs/frontend.md shows the same programs."""
import kvyard.lang as sgl
from kvyard.lang import assistant, function, gen, system, user


# -- quick start: a multi-turn chat --------------------------------------------------------
@function
def multi_turn_question(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=24))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=24))


# -- control flow with choices -------------------------------------------------------------
@function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + gen("expression", max_tokens=12, stop="\n")
    elif s["tool"] == "search engine":
        s += "The key word to search is" + gen("word", max_tokens=12, stop="\n")


# -- fork parallelism ----------------------------------------------------------------------
@function
def tip_suggestion(s):
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i+1} into a paragraph:\n"
        f += gen("detailed_tip", max_tokens=16, stop="\n\n")
    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary" + gen("summary", max_tokens=12)


# -- constrained decoding: regex -----------------------------------------------------------
IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


@function
def regular_expression_gen(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + gen("answer", temperature=0, regex=IP_REGEX)


# -- JSON decoding -------------------------------------------------------------------------
CHARACTER_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "house": {"type": "string", "enum": ["Gryffindor", "Slytherin", "Ravenclaw", "Hufflepuff"]},
        "blood_status": {"type": "string", "enum": ["Pure-blood", "Half-blood", "Muggle-born"]},
        "wand_length": {"type": "integer", "minimum": 1, "maximum": 20},
    },
    "required": ["name", "house", "blood_status", "wand_length"],
    "additionalProperties": False,
}


@function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += gen("json_output", max_tokens=96, json_schema=CHARACTER_SCHEMA)


# -- batching ------------------------------------------------------------------------------
@function
def text_qa(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + gen("answer", stop="\n", max_tokens=16)


# -- streaming -----------------------------------------------------------------------------
def stream_a_variable(backend):
    state = multi_turn_question.run(
        question_1="What is the capital of the United States?",
        question_2="List two local attractions.",
        stream=True, temperature=0, backend=backend,
    )
    return state, list(state.text_iter(var_name="answer_2"))


# -- choices methods -----------------------------------------------------------------------
@function
def choose_with(s, question, choices, method):
    s += "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", choices=choices, choices_method=method)


CHOICES_METHODS = [sgl.token_length_normalized, sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized]

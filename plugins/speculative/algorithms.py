"""Entry-point module of the built-in speculative algorithms; each is imported when selected."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_speculative_algorithms(register):
    register("NGRAM", "kvyard_plugins.speculative.ngram:NgramAlgorithm")
    register("STANDALONE", "kvyard_plugins.speculative.standalone:StandaloneAlgorithm")
    register("EAGLE", "kvyard_plugins.speculative.eagle:EagleAlgorithm")
    register("EAGLE3", "kvyard_plugins.speculative.eagle3:Eagle3Algorithm")

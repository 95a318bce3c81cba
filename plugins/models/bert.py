"""Entry-point module: BERT-style encoders served as embedding models."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_model_architectures(register):
    for arch in ("BertModel", "BertForMaskedLM"):
        register(arch, "kvyard_plugins.models.bert_model:BertEmbeddingModel")

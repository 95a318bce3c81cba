"""Entry-point module: BERT-style encoders (BERT, XLM-RoBERTa) served as embedding models and as
cross-encoder / classification models (bert_model.py, imported when one of them is loaded)."""
from kvyard.hookspecs import hookimpl

_IMPL = "kvyard_plugins.models.bert_model"
ARCHITECTURES = {
    "BertModel": "BertEmbeddingModel", "BertForMaskedLM": "BertEmbeddingModel",
    "BertForSequenceClassification": "BertForSequenceClassification",
    "XLMRobertaModel": "XLMRobertaModel",
    "XLMRobertaForSequenceClassification": "XLMRobertaForSequenceClassification",
}


@hookimpl
def register_model_architectures(register):
    for arch, cls in ARCHITECTURES.items():
        register(arch, f"{_IMPL}:{cls}")

# placeholder until the Ollama provider lands (being written now)
from appliance.providers.openai_compat import OpenAICompatProvider


class OllamaProvider(OpenAICompatProvider):
    def __init__(self, settings, transport):
        super().__init__(settings, transport, "ollama")

"""The client-facing APIs beyond chat: Anthropic Messages and OpenAI Responses, each translated to and from
chat completions (request, answer, stream), and the surfaces that plug them into the pipeline.

Imports core/ and the layers below it; the translations themselves do no I/O.
"""

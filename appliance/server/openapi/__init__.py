"""The appliance's own OpenAPI 3.1 document, served at GET /openapi.json.

vendored.py reads the part of OpenAI's published spec the OpenAI paths reuse (openai.json, written by
build/vendor_openapi.py); schemas.py holds the appliance's own schemas; operations.py describes each route;
document.py assembles them over the routes the app actually registers.
"""

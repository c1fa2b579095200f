"""fedquant for any Flower app: a client mod and a strategy wrapper (``pip install
fedquant[flower]``).

They pair the way Flower's own ``fixedclipping_mod`` pairs with
``DifferentialPrivacyClientSideFixedClipping``: the wrapper names the codec and the round
seed in each train message's config; the mod compresses the ClientApp's reply with it; the
wrapper decodes the replies back into ordinary ArrayRecords before the inner strategy
aggregates them::

    from fedquant.flower import CompressedStrategy, compression_mod

    app = ClientApp(mods=[compression_mod])                              # client side
    strategy = CompressedStrategy(FedAvg(...), codec="eden:bits=2")      # server side
"""

from fedquant.flower.keys import PAYLOAD_KEY, PAYLOAD_STYPE
from fedquant.flower.mod import compression_mod
from fedquant.flower.strategy import CompressedStrategy

__all__ = ["PAYLOAD_KEY", "PAYLOAD_STYPE", "CompressedStrategy", "compression_mod"]

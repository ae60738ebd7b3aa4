"""Object hallucination: what a caption says is there that is not (Rohrbach et al., "Object Hallucination in
Image Captioning", EMNLP 2018).

- CHAIR-i: hallucinated object mentions / all object mentions (over the 80 COCO categories).
- CHAIR-s: captions with at least one hallucinated object / all captions.
- people invention: captions that mention a person while nothing says the image holds one.
- count invention: captions that speak of several ("two", "a group of", a plural) where every reference
  speaks of one.

An image's ground-truth objects are those its reference captions mention (mapped through the same synonym
table), plus, when given, the categories of its COCO instance annotations (`load_instance_categories`).
Words map to categories through `SYNONYMS`; two-word names ("hot dog", "teddy bear") are matched first, and
a few words are never objects in the phrases where captions use them ("hot dog" is food, not a dog; "teddy
bear" is not a bear). Pure Python: no tokenizer data, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .vocab import tokenize

# COCO category -> the words (singular) a caption uses for it. After Rohrbach et al.'s synonym table, with
# bicycle and motorcycle kept apart.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult",
               "rider", "children", "baby", "worker", "passenger", "sister", "biker", "policeman", "cop",
               "officer", "lady", "cowboy", "bride", "groom", "male", "female", "guy", "traveler", "mother",
               "father", "gentleman", "player", "skier", "snowboarder", "skater", "skateboarder",
               "surfer", "catcher", "batter", "umpire", "teenager", "toddler", "infant", "daughter", "son",
               "wife", "husband", "grandmother", "grandfather", "friend", "crowd", "spectator",
               "tourist", "student", "teacher", "soldier", "doctor", "nurse", "athlete", "audience",
               "pedestrian", "customer", "someone", "somebody", "men", "women", "he", "she", "astronaut",
               "photographer", "teen", "youngster", "vendor", "farmer", "businessman"),
    "bicycle": ("bicycle", "bike", "cycle", "unicycle", "tricycle"),
    "car": ("car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxi",
            "limo", "limousine"),
    "motorcycle": ("motorcycle", "motor bike", "motor cycle", "motorbike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus",
                 "biplane", "seaplane", "airliner"),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tram", "subway"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": ("boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
             "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler",
             "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard", "steamboat"),
    "traffic light": ("traffic light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench", "pew"),
    "bird": ("bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
             "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey",
             "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird",
             "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot",
             "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey",
             "oriole", "cowbird", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin", "vulture",
             "condor", "macaw", "peafowl", "cockatoo", "songbird", "eagle", "hawk", "chicken", "hen"),
    "cat": ("cat", "kitten", "feline", "tabby", "kitty"),
    "dog": ("dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
            "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt",
            "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound",
            "retriever", "brindle", "hound", "whippet", "husky"),
    "horse": ("horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
              "mustang", "clydesdale", "bronc", "bronco"),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": ("cow", "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "wallet", "purse", "briefcase"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "baseball", "football", "soccer ball", "basketball", "softball", "volleyball",
                    "tennis ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass"),
    "cup": ("cup", "mug", "espresso"),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife", "knives"),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("chair", "seat", "stool", "recliner"),
    "couch": ("couch", "sofa", "loveseat", "futon"),
    "potted plant": ("potted plant", "houseplant", "plant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "monitor", "television", "telly"),
    "laptop": ("laptop", "computer", "notebook", "netbook", "lenovo", "macbook"),
    "mouse": ("mouse",),
    "remote": ("remote", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone",
                   "iphone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove", "stovetop"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "teddybear", "stuffed animal", "animal doll"),
    "hair drier": ("hair drier", "hairdryer", "hair dryer", "blow dryer", "blowdryer", "blow drier"),
    "toothbrush": ("toothbrush",),
}

# Multi-word phrases whose words must not be read as the objects they contain (after Rohrbach et al.).
NOT_OBJECTS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stuffed animal", "dining table", "hair dryer", "blow dryer",
    "toilet seat", "tennis ball", "soccer ball", "dirt bike", "animal doll",
)
_PHRASE_CATEGORY = {w: c for c, words in SYNONYMS.items() for w in words if " " in w}
# A phrase that names no object of its own ("toilet seat" is part of a toilet, not a chair).
_PHRASE_CATEGORY.update({"toilet seat": "toilet", "laptop computer": "laptop", "street light": "traffic light"})
_WORD_CATEGORY = {w: c for c, words in SYNONYMS.items() for w in words if " " not in w}

PERSON = "person"
# Words that say "more than one" by themselves; plurals of object words count too (see `caption_objects`).
COUNT_WORDS = frozenset({
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "multiple",
    "group", "groups", "crowd", "bunch", "couple", "pair", "few", "lots", "numerous", "herd", "flock", "team",
    "people", "men", "women", "children", "kids", "both", "dozens",
})
_IRREGULAR_PLURALS = {"people": "person", "men": "man", "women": "woman", "children": "child", "geese": "goose",
                      "mice": "mouse", "knives": "knife", "oxen": "ox", "teeth": "tooth", "feet": "foot"}
_NEVER_PLURAL = frozenset({"skis", "scissors", "glass", "bus", "grass", "dress", "glasses", "sheep", "cattle",
                           "series", "species", "chess", "tennis", "bass", "canvas", "bonus", "octopus", "cactus",
                           "asparagus", "hummus", "walrus", "citrus", "lotus", "couscous", "christmas"})


@dataclass(frozen=True)
class Mention:
    category: str
    word: str  # as written ("motorcycles")
    plural: bool


def singular(word: str) -> tuple[str, bool]:
    """(singular form, was it plural) by English rules good enough for caption nouns."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word], True
    if word in _NEVER_PLURAL or len(word) <= 3 or not word.endswith("s") or word.endswith("ss"):
        return word, False
    for suffix, replacement in (("ies", "y"), ("ves", "f"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"),
                                ("sses", "ss"), ("oes", "o"), ("ses", "s")):
        if word.endswith(suffix) and (stem := word[: -len(suffix)] + replacement) in _WORD_CATEGORY:
            return stem, True
    return word[:-1], True


def caption_objects(caption: str | Sequence[str]) -> list[Mention]:
    """Every object mention of a caption, in order: two-word names first, then single words (plurals folded)."""
    words = tokenize(caption) if isinstance(caption, str) else list(caption)
    mentions: list[Mention] = []
    i = 0
    while i < len(words):
        if i + 1 < len(words):
            first, _ = singular(words[i])
            second, plural = singular(words[i + 1])
            for phrase in (f"{words[i]} {second}", f"{first} {second}"):
                if phrase in _PHRASE_CATEGORY or phrase in NOT_OBJECTS:
                    if phrase in _PHRASE_CATEGORY:
                        mentions.append(Mention(_PHRASE_CATEGORY[phrase], f"{words[i]} {words[i + 1]}", plural))
                    i += 2
                    break
            else:
                first = None
            if first is not None:
                continue
        base, plural = singular(words[i])
        category = _WORD_CATEGORY.get(words[i]) or _WORD_CATEGORY.get(base)
        if category is not None:
            mentions.append(Mention(category, words[i], plural and words[i] not in _WORD_CATEGORY))
        i += 1
    return mentions


def says_several(caption: str | Sequence[str]) -> bool:
    """Whether a caption speaks of more than one of something: a count word or a plural object."""
    words = tokenize(caption) if isinstance(caption, str) else list(caption)
    return bool(COUNT_WORDS.intersection(words)) or any(m.plural for m in caption_objects(words))


def reference_objects(references: Iterable[str]) -> set[str]:
    return {m.category for reference in references for m in caption_objects(reference)}


def load_instance_categories(instances_file: str | Path) -> dict[int, set[str]]:
    """image id -> the names of its annotated categories, from a COCO instances file (instances_val2017.json)."""
    data = json.loads(Path(instances_file).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    unknown = set(names.values()) - set(SYNONYMS)
    if unknown:
        raise ValueError(f"{instances_file}: categories that are not COCO's 80: {sorted(unknown)[:5]}")
    found: dict[int, set[str]] = {}
    for annotation in data["annotations"]:
        found.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    return found


@dataclass(frozen=True)
class CaptionCheck:
    """What one caption says that its image's ground truth does not hold."""

    mentioned: list[str]  # categories mentioned, once per mention
    hallucinated: list[str]  # the mentions that are not in the ground truth
    invents_people: bool
    invents_count: bool


def check_caption(caption: str, references: Sequence[str], annotated: Iterable[str] = ()) -> CaptionCheck:
    truth = reference_objects(references) | set(annotated)
    mentioned = [m.category for m in caption_objects(caption)]
    hallucinated = [c for c in mentioned if c not in truth]
    invents_count = says_several(caption) and not any(says_several(r) for r in references)
    return CaptionCheck(mentioned, hallucinated, PERSON in hallucinated, invents_count)


def hallucination_scores(
    predictions: Mapping[int, str],
    references: Mapping[int, Sequence[str]],
    instances: Mapping[int, Iterable[str]] | None = None,
) -> dict[str, float]:
    """CHAIR-i, CHAIR-s, the people- and count-invention rates over `predictions` (image id -> caption)."""
    if not predictions:
        raise ValueError("no predictions to score")
    checks = [check_caption(caption, references[i], (instances or {}).get(i, ())) for i, caption in
              predictions.items()]
    mentions = sum(len(c.mentioned) for c in checks)
    n = len(checks)
    return {
        "CHAIR-i": sum(len(c.hallucinated) for c in checks) / max(mentions, 1),
        "CHAIR-s": sum(bool(c.hallucinated) for c in checks) / n,
        "people_invention": sum(c.invents_people for c in checks) / n,
        "count_invention": sum(c.invents_count for c in checks) / n,
    }


@dataclass(frozen=True)
class CheckPhoto:
    """One photo of a check set (benchmarks/data/noncoco/manifest.json)."""

    file: Path
    description: str
    right: tuple[str, ...]  # a right caption holds at least one of these words
    objects: frozenset[str]  # the COCO categories really there: naming any other is inventing it
    single: bool  # one main thing: "two", "a group of" or a plural invents a count


def load_check_set(manifest: str | Path) -> list[CheckPhoto]:
    manifest = Path(manifest)
    data = json.loads(manifest.read_text())
    photos = []
    for entry in data["photos"]:
        unknown = set(entry["objects"]) - set(SYNONYMS)
        if unknown:
            raise ValueError(f"{manifest}: {entry['file']}: not COCO categories: {sorted(unknown)}")
        photos.append(CheckPhoto(manifest.parent / entry["file"], entry["description"], tuple(entry["right"]),
                                 frozenset(entry["objects"]), bool(entry["single"])))
    return photos


@dataclass(frozen=True)
class CheckResult:
    caption: str
    right: bool
    invented: list[str]  # COCO categories named that are not there
    invents_people: bool
    invents_count: bool

    @property
    def free_of_inventions(self) -> bool:
        return not self.invented and not self.invents_count


def check_photo(photo: CheckPhoto, caption: str) -> CheckResult:
    words = tokenize(caption)
    singular_words = {singular(w)[0] for w in words}
    invented = [m.category for m in caption_objects(words) if m.category not in photo.objects]
    return CheckResult(
        caption=caption,
        right=any(w in words or w in singular_words for w in photo.right),
        invented=invented,
        invents_people=PERSON in invented,
        invents_count=photo.single and says_several(words),
    )


def check_set_scores(results: Sequence[CheckResult]) -> dict[str, float]:
    """Shares of the check set: right captions, people invented, counts invented, captions free of inventions."""
    if not results:
        raise ValueError("no captions to check")
    n = len(results)
    return {
        "right": sum(r.right for r in results) / n,
        "people_invention": sum(r.invents_people for r in results) / n,
        "count_invention": sum(r.invents_count for r in results) / n,
        "free_of_inventions": sum(r.free_of_inventions for r in results) / n,
        "photos": n,
    }

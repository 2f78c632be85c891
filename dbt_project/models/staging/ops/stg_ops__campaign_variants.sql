with

source as (

    select * from {{ source('ops', 'campaign_variants') }}

),

renamed as (

    select
        campaign_id,
        variant,
        template,
        sender_id

    from source

)

select * from renamed
